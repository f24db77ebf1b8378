"""Triton kernels against a float64 torch reference built straight from random codes, zeros and scales
(never from the code under test). Outputs are poisoned with NaN first, so an unwritten element fails.

Small shapes run everywhere (CPU under TRITON_INTERPRET=1 in CI); `gpu` tests add large shapes, CUDA graphs
and a second device. Shapes are chosen so N and K are not multiples of the tiles and the last group is
partial (K % group_size != 0).
"""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch

from lowbit.export.auto_awq import pack_columns
from lowbit.kernels.repack import Packed, from_awq, from_gptq
from lowbit.kernels.triton.dequant import dequantize
from lowbit.kernels.triton.matmul import Config, quant_matmul
from lowbit.quant.pack import pack_bitstream

# relative error ||out - ref|| / ||ref|| allowed per activation dtype (fp32 accumulation; the rest is the
# rounding of the weight tile and of the output to 16 bits)
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def random_layer(n: int, k: int, bits: int, group_size: int, sym: bool, seed: int):
    """Random codes [K, N], zeros [G, N], scales fp16 [G, N] and their float64 W^T [K, N]."""
    gen = torch.Generator().manual_seed(seed)
    gs = k if group_size == -1 else group_size
    g = -(-k // gs)
    codes = torch.randint(0, 2**bits, (k, n), generator=gen)
    zeros = torch.full((g, n), 2 ** (bits - 1)) if sym else torch.randint(0, 2**bits, (g, n), generator=gen)
    scales = (torch.rand(g, n, generator=gen) * 0.05 + 0.005).half()
    group = torch.arange(k) // gs
    w_t = (codes.double() - zeros.double()[group]) * scales.double()[group]  # [K, N]
    return codes, zeros, scales, gs, w_t


def gptq_packed(codes, zeros, scales, bits, gs, zero_offset, device) -> Packed:
    """Through the checkpoint layout (qzeros store zero - zero_offset) and the load-time repack."""
    qweight = pack_bitstream(codes, bits, dim=0)
    qzeros = pack_bitstream(zeros - zero_offset, bits, dim=1)
    p = from_gptq(qweight.to(device), qzeros.to(device), scales.to(device), bits, gs, zero_offset)
    return p


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output: an element was not written"
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


# (M, N, K): N, K off the tiles; K = 160 with group 64/128 leaves a partial last group
SMALL = [(1, 40, 160), (5, 72, 96), (33, 24, 224)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quant_matmul_small(device, bits, group_size, sym, dtype):
    for i, (m, n, k) in enumerate(SMALL):
        seed = zlib.crc32(repr((bits, group_size, sym, dtype, i)).encode())  # stable across runs, unlike hash()
        codes, zeros, scales, gs, w_t = random_layer(n, k, bits, group_size, sym, seed)
        p = gptq_packed(codes, zeros, scales, bits, gs, int(sym), device)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
        bias = torch.randn(n).to(dtype) if i % 2 else None
        ref = x.double() @ w_t + (0 if bias is None else bias.double())
        out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
        got = quant_matmul(x.to(device), p, None if bias is None else bias.to(device), out=out)
        assert got.data_ptr() == out.data_ptr()
        assert rel_err(out, ref) < TOL[dtype], (m, n, k)


# Every code path of the kernel, forced: split-K with scale-after-dot, per-element dequant with one group
# per chunk, groups smaller than the chunk, the grouped GEMM order with several M tiles, dequant + matmul.
CONFIGS = {
    "splitk_after_dot": Config(16, 32, 32, split_k=3),
    "splitk_per_element": Config(16, 32, 32, split_k=2, scale_after_dot=False),
    "gemm_small_groups": Config(16, 32, 64, group_m=2, scale_after_dot=False),
    "dequant_cublas": None,
    # split unpack: block_k * bits / 32 >= 16 on the GPU (tl.dot's smallest depth), so block_k = 512 / bits
    "split_unpack_small_groups": "split",
    # the FMA GEMV (gemv.py) with 4 M-rows per program (3 row blocks at M = 9, the last with one row), chunks
    # cut to the 32-wide groups
    "gemv": Config(4, 32, 128, split_k=2, gemv=True),
    # magic-number code conversion in the split-K dot path (scale after the dot, zero folded into the codes)
    "splitk_magic": Config(16, 32, 32, split_k=3, magic=True),
}


@pytest.mark.parametrize("path", list(CONFIGS))
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quant_matmul_paths(device, path, bits):
    # 4 M-tiles of 16, N and K off the tiles, 7 groups; the GEMV path, the slowest by far under the interpreter,
    # takes 9 rows (its row blocks are 4 rows)
    m, n, k, gs = 9 if path == "gemv" else 50, 48, 224, 32
    codes, zeros, scales, gs, w_t = random_layer(n, k, bits, gs, False, seed=bits * 7 + len(path))
    p = gptq_packed(codes, zeros, scales, bits, gs, 0, device)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3))
    bias = torch.randn(n)
    out = torch.full((m, n), float("nan"), dtype=torch.float16, device=device)
    config = Config(16, 32, 512 // bits, split_k=2, scale_after_dot=False, split_unpack=True) if CONFIGS[path] == "split" else CONFIGS[path]
    quant_matmul(x.half().to(device), p, bias.half().to(device), config=config, out=out)
    assert rel_err(out, x.half().double() @ w_t + bias.half().double()) < TOL[torch.float16]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [128, -1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_split_unpack_after_dot(device, bits, group_size, dtype):
    """Split unpack with the scale applied after the dot (one group per chunk); K = 320 leaves a partial
    last group at 128 and, for 2 bits (block_k 256), a partial last chunk."""
    m, n, k = 5, 48, 320
    block_k = min(512 // bits, 128)
    if block_k * bits // 32 < 16:
        block_k = 512 // bits  # 2 bits: 256-wide chunks, so group 128 no longer holds one chunk
    codes, zeros, scales, gs, w_t = random_layer(n, k, bits, group_size, False, seed=bits + group_size)
    p = gptq_packed(codes, zeros, scales, bits, gs, 0, device)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(4)).to(dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    quant_matmul(x.to(device), p, config=Config(16, 32, block_k, split_k=2, split_unpack=True), out=out)
    assert rel_err(out, x.double() @ w_t) < TOL[dtype]


@pytest.mark.parametrize("group_size", [128, 256, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unpack4(device, group_size, sym, dtype):
    """The 4-bit two-codes-per-instruction unpack (unpack4.py; inline PTX on the GPU, its plain-Triton twin
    under the interpreter): every code 0..15 against every zero; the split form at M = 1, 7, 9 and 45 (x loaded once per chunk,
    16- and 32-row tiles) and 19 (two row tiles) and the interleaved form at M = 37 and 70; N off the tile, K = 416 (a partial last chunk and group),
    split-K with a partial last split, bias, 64, 128 and 256-wide chunks."""
    n, k = 136, 416
    seed = zlib.crc32(repr(("unpack4", group_size, sym, dtype)).encode())
    codes, zeros, scales, gs, w_t = random_layer(n, k, 4, group_size, sym, seed)
    p = gptq_packed(codes, zeros, scales, 4, gs, int(sym), device)
    for m, cfg in ((1, Config(16, 128, 128, split_k=3, unpack4=True, split_unpack=True)),
                   (7, Config(16, 64, 128, split_k=1, num_warps=4, unpack4=True, split_unpack=True)),
                   (9, Config(16, 128, 128, split_k=2, num_warps=4, unpack4=True, split_unpack=True, x_once=True)),
                   (45, Config(32, 128, 128, split_k=2, num_warps=4, unpack4=True, split_unpack=True, x_once=True)),
                   (19, Config(16, 128, 256 if group_size != 128 else 128, split_k=2, num_warps=8, unpack4=True, split_unpack=True)),
                   # the interleaved form: one deep dot per chunk (larger M), 64- and 128-deep chunks
                   (37, Config(32, 64, 128, split_k=2, num_warps=4, unpack4=True)),
                   (70, Config(64, 128, 64, split_k=1, num_warps=8, unpack4=True))):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + m)).to(dtype)
        bias = torch.randn(n).to(dtype)
        out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
        quant_matmul(x.to(device), p, bias.to(device), config=cfg, out=out)
        assert rel_err(out, x.double() @ w_t + bias.double()) < TOL[dtype], (m, cfg)


@pytest.mark.parametrize("group_size", [128, 256, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_swap_ab(device, group_size, sym, dtype):
    """swapab.py (the unpacked weight as the dot's first operand, out^T = W x^T): every code against every
    zero, x reordered in the kernel and in torch (x_permuted; K = 384 divides the 128-deep chunk, K = 416 leaves
    a partial last chunk and group, where x_permuted falls back to the in-kernel order), token tiles of 16 and
    32 with M off them, N off the 64-column tile, K splits through both reduce paths, bias, x rows not adjacent."""
    from lowbit.kernels.triton import splitk

    n = 136
    for k, m, cfg, in_kernel in ((416, 19, Config(16, 64, 128, split_k=1, swap_ab=True), None),
                                 (416, 45, Config(32, 64, 128, split_k=3, swap_ab=True), True),
                                 (384, 37, Config(16, 64, 128, split_k=2, swap_ab=True, x_permuted=True), False),
                                 (384, 5, Config(16, 128, 128, split_k=1, num_warps=8, swap_ab=True, x_permuted=True, max_registers=128), None)):
        seed = zlib.crc32(repr(("swap_ab", group_size, sym, dtype, k, m)).encode())
        codes, zeros, scales, gs, w_t = random_layer(n, k, 4, group_size, sym, seed)
        p = gptq_packed(codes, zeros, scales, 4, gs, int(sym), device)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
        bias = torch.randn(n).to(dtype)
        out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
        x_rows_strided = torch.cat([x, x], 1).to(device)[:, :k]  # rows 2K apart: the kernel and permute_x take strides
        quant_matmul(x_rows_strided, p, bias.to(device), config=cfg, out=out, in_kernel_reduce=in_kernel)
        assert rel_err(out, x.double() @ w_t + bias.double()) < TOL[dtype], (k, m, cfg)
        if in_kernel:
            ws, counters = splitk._workspaces[out.device]
            assert not ws.any() and not counters.any()


def test_swap_ab_needs_a_group_per_chunk(device):
    """Groups of 64 (two per 128-deep chunk) or 8 bits cannot take the swap-AB kernel: one-line error."""
    for bits, gs in ((4, 64), (8, 128)):
        codes, zeros, scales, gs, _ = random_layer(32, 256, bits, gs, False, seed=3)
        p = gptq_packed(codes, zeros, scales, bits, gs, 0, device)
        with pytest.raises(ValueError, match="swap-AB kernel reads 4 bits with one group per 128-deep chunk"):
            quant_matmul(torch.zeros(20, 256, dtype=torch.float16, device=device), p, config=Config(16, 64, 128, swap_ab=True))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv(device, bits, group_size, dtype):
    """The FMA GEMV as gemv_config launches it (M = 1 and 3: one row block of 1 and of 4 with a masked row),
    the place-value trick at every code position, split-K with a partial last chunk (K = 352)."""
    from lowbit.kernels.triton.matmul import gemv_config

    n, k = 48, 352
    for m in (1, 3):
        sym = m == 1
        seed = zlib.crc32(repr(("gemv", bits, group_size, dtype, m)).encode())
        codes, zeros, scales, gs, w_t = random_layer(n, k, bits, group_size, sym, seed)
        p = gptq_packed(codes, zeros, scales, bits, gs, int(sym), device)
        cfg = gemv_config(m, n, k)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
        bias = torch.randn(n).to(dtype)
        out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
        quant_matmul(x.to(device), p, bias.to(device), config=dataclasses.replace(cfg, split_k=2), out=out)
        assert rel_err(out, x.double() @ w_t + bias.double()) < TOL[dtype], m


@pytest.mark.parametrize("path", ["dot", "gemv"])
def test_split_k_reduced_in_kernel(device, path):
    """K splits meeting inside the launch (splitk.py): the last program per tile writes out and leaves the
    shared workspace and counters at zero, so back-to-back calls of other shapes stay right; the bias is
    added once; the zero-fill + cast fallback gives the same result."""
    from lowbit.kernels.triton import splitk

    cfg = Config(16, 32, 32, split_k=3, magic=True) if path == "dot" else Config(4, 32, 32, split_k=3, gemv=True)
    for i, (m, n, k) in enumerate([(50, 48, 224), (3, 40, 160), (50, 48, 224)]):
        codes, zeros, scales, gs, w_t = random_layer(n, k, 4, 32, False, seed=40 + i)
        p = gptq_packed(codes, zeros, scales, 4, gs, 0, device)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(i)).half()
        bias = torch.randn(n).half()
        ref = x.double() @ w_t + bias.double()
        outs = []
        for in_kernel in (True, False):
            out = torch.full((m, n), float("nan"), dtype=torch.float16, device=device)
            quant_matmul(x.to(device), p, bias.to(device), config=cfg, out=out, in_kernel_reduce=in_kernel)
            assert rel_err(out, ref) < TOL[torch.float16], (i, in_kernel)
            outs.append(out)
        ws, counters = splitk._workspaces[outs[0].device]  # "cuda" -> cuda:0
        assert not ws.any() and not counters.any(), "workspace or counters not left at zero"
        assert (outs[0] - outs[1]).abs().max() <= 1e-3 * outs[1].abs().max()  # fp32 sums in another order


@pytest.mark.parametrize("overlap", [False, True])
def test_dequant_gemm_slabs(device, overlap):
    """Dequantize + cuBLAS in column slabs (dequant_gemm.py): a last slab narrower than the others, the bias
    sliced per slab, every output column written (out poisoned); on the GPU with overlap, slabs on a side
    stream with two buffers."""
    from lowbit.kernels.triton.dequant_gemm import DequantGemm

    m, n, k = 7, 200, 160
    codes, zeros, scales, gs, w_t = random_layer(n, k, 4, 32, False, seed=31)
    p = gptq_packed(codes, zeros, scales, 4, gs, 0, device)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(32)).half()
    bias = torch.randn(n).half()
    for plan in (DequantGemm(64, overlap), DequantGemm(128, overlap), DequantGemm(0)):
        out = torch.full((m, n), float("nan"), dtype=torch.float16, device=device)
        quant_matmul(x.to(device), p, bias.to(device), config=plan, out=out)
        assert rel_err(out, x.double() @ w_t + bias.double()) < TOL[torch.float16], plan


@pytest.mark.parametrize("in_kernel", [True, False])
def test_stream_k(device, in_kernel):
    """Stream-K (Config.stream_k): programs take equal runs of the tiles x chunks steps, crossing tile
    boundaries, and each tile's ticket awaits exactly the programs that met in it (right output, counters
    back at zero); the bias comes once, from the partial holding the tile's first chunk. The dot path with
    7 chunks x 8 tiles over 2-3 programs per SM, and the x_once unpack4 path with 5 chunks x 2 tiles."""
    from lowbit.kernels.triton import splitk

    cases = [(50, 48, 224, 32, Config(16, 32, 32, magic=True, stream_k=3)),
             (5, 48, 640, 128, Config(16, 32, 128, num_stages=3, split_unpack=True, unpack4=True, x_once=True, stream_k=2))]
    for i, (m, n, k, gs, cfg) in enumerate(cases):
        codes, zeros, scales, gs, w_t = random_layer(n, k, 4, gs, False, seed=60 + i)
        p = gptq_packed(codes, zeros, scales, 4, gs, 0, device)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(i)).half()
        bias = torch.randn(n).half()
        out = torch.full((m, n), float("nan"), dtype=torch.float16, device=device)
        quant_matmul(x.to(device), p, bias.to(device), config=cfg, out=out, in_kernel_reduce=in_kernel)
        assert rel_err(out, x.double() @ w_t + bias.double()) < TOL[torch.float16], i
        if in_kernel:
            ws, counters = splitk._workspaces[out.device]
            assert not ws.any() and not counters.any(), i


def test_gemv_odd_group_falls_back(device):
    """A group size the GEMV cannot chunk (96: not a power of two) runs on the split-unpack dot path."""
    codes, zeros, scales, gs, w_t = random_layer(40, 192, 4, 96, False, seed=21)
    p = gptq_packed(codes, zeros, scales, 4, gs, 0, device)
    x = torch.randn(2, 192, generator=torch.Generator().manual_seed(22)).half()
    out = torch.full((2, 40), float("nan"), dtype=torch.float16, device=device)
    quant_matmul(x.to(device), p, out=out)
    assert rel_err(out, x.double() @ w_t) < TOL[torch.float16]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dequantize(device, bits, dtype):
    codes, zeros, scales, gs, w_t = random_layer(48, 96, bits, 64, False, seed=bits)
    p = gptq_packed(codes, zeros, scales, bits, gs, 0, device)
    out = torch.full((96, 48), float("nan"), dtype=dtype, device=device)
    dequantize(p, dtype, out=out)
    tol = 1e-6 if dtype == torch.float32 else TOL[dtype] / 2
    assert rel_err(out, w_t) < tol


@pytest.mark.parametrize("group_size", [128, 256, -1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_unpack4(device, group_size, dtype):
    """The 4-bit dequantize with unpack4 (one group per 128 rows): (q - z) * s rounded once, so equal bit for
    bit to the float64 reference rounded to the dtype; K = 392 ends in a partial chunk, N = 296 off the
    256-wide tile; cols= writes a column range only."""
    n, k = 296, 392
    codes, zeros, scales, gs, w_t = random_layer(n, k, 4, group_size, False, seed=group_size % 97)
    p = gptq_packed(codes, zeros, scales, 4, gs, 0, device)
    out = torch.full((k, n), float("nan"), dtype=dtype, device=device)
    dequantize(p, dtype, out=out)
    part = dequantize(p, dtype, cols=(40, 200))
    assert part.shape == (k, 200)
    for got, ref in ((out.cpu(), w_t), (part.cpu(), w_t[:, 40:240])):
        if dtype == torch.bfloat16 and device != "cuda":
            # Triton's interpreter truncates fp32 -> bf16 (the GPU rounds to nearest): within one bf16 step
            assert ((got.double() - ref).abs() <= ref.abs() * 2**-7).all()
        else:
            assert torch.equal(got, ref.to(dtype))


def test_awq_repack_matches_reference(device):
    n, k, gs = 64, 96, 32
    codes, zeros, scales, gs, w_t = random_layer(n, k, 4, gs, False, seed=11)
    qweight = pack_columns(codes)  # [K, N/8], the exporter's packer (tests/unit/export pins its words)
    qzeros = pack_columns(zeros)  # [G, N/8]
    # the interleave is real: packing in plain order gives other words
    assert not torch.equal(qweight, pack_bitstream(codes, 4, dim=1))
    p = from_awq(qweight.to(device), qzeros.to(device), scales.to(device), gs)
    out = torch.full((k, n), float("nan"), dtype=torch.float32, device=device)
    assert rel_err(dequantize(p, torch.float32, out=out), w_t) < 1e-6


def test_shape_checks(device):
    codes, zeros, scales, gs, _ = random_layer(32, 64, 4, 32, False, seed=0)
    p = gptq_packed(codes, zeros, scales, 4, gs, 0, device)
    with pytest.raises(ValueError):
        quant_matmul(torch.randn(2, 63, dtype=torch.float16, device=device), p)
    with pytest.raises(ValueError):
        quant_matmul(torch.randn(2, 64, device=device), p)  # fp32 activations


def test_custom_op_and_fake(device):
    from lowbit.kernels import ops

    codes, zeros, scales, gs, w_t = random_layer(24, 64, 4, 32, False, seed=5)
    p = gptq_packed(codes, zeros, scales, 4, gs, 0, device)
    x = torch.randn(2, 3, 64, dtype=torch.float16, device=device)
    out = torch.ops.lowbit.quant_linear(x, p.qweight, p.scales, p.zeros, None, 4, gs)
    assert out.shape == (2, 3, 24)
    assert rel_err(out.reshape(6, 24), x.reshape(6, 64).double().cpu() @ w_t) < TOL[torch.float16]
    torch.library.opcheck(ops.quant_linear, (x, p.qweight, p.scales, p.zeros, None, 4, gs), test_utils=("test_schema", "test_faketensor"))

    compiled = torch.compile(lambda t: ops.quant_linear(t, p.qweight, p.scales, p.zeros, None, 4, gs) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), out * 2)


def test_quantlinear_picks_path(device):
    """QuantLinear: torch path on the CPU; on CUDA, Triton, agreeing with the torch path."""
    from lowbit.kernels.linear import QuantLinear

    n, k, gs = 48, 160, 64
    codes, zeros, scales, gs, w_t = random_layer(n, k, 4, gs, True, seed=9)
    layer = QuantLinear(k, n, 4, gs, zero_offset=1)
    layer.qweight.copy_(pack_bitstream(codes, 4, dim=0))
    layer.qzeros.copy_(pack_bitstream(zeros - 1, 4, dim=1))
    layer.scales.copy_(scales)
    x = torch.randn(3, k)
    assert not layer.uses_triton(x)
    torch.testing.assert_close(layer.dequantize_weight(torch.float64).t(), w_t)
    if device == "cuda":
        layer = layer.cuda()
        xh = x.half().cuda()
        assert layer.uses_triton(xh)
        assert rel_err(layer(xh), x.half().double() @ w_t) < TOL[torch.float16]


# ---------------------------------------------------------------- GPU only


def _gpu(n_devices: int = 1):
    if not torch.cuda.is_available() or torch.cuda.device_count() < n_devices:
        pytest.skip(f"needs {n_devices} CUDA device(s)")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16, 40, 64, 256, 1024])
@pytest.mark.parametrize("bits,group_size,sym", [(4, 128, False), (4, 32, True), (8, -1, True), (4, 64, False)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_large(m, bits, group_size, sym, dtype):
    _gpu()
    n, k = 4104, 2176  # off every tile; K % 128 = 0 but K % 256 != 0, partial groups at 1 when gs=-1
    codes, zeros, scales, gs, w_t = random_layer(n, k, bits, group_size, sym, seed=m)
    p = gptq_packed(codes, zeros, scales, bits, gs, int(sym), "cuda")
    x = torch.randn(m, k).to(dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    quant_matmul(x.cuda(), p, out=out)
    ref = (x.double().cuda() @ w_t.cuda()).cpu()  # float64 on the GPU: the CPU is slow at M=1024
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.gpu
def test_gpu_cuda_graph():
    _gpu()
    from lowbit.kernels import ops

    codes, zeros, scales, gs, w_t = random_layer(512, 1024, 4, 128, False, seed=1)
    p = gptq_packed(codes, zeros, scales, 4, gs, 0, "cuda")
    x = torch.randn(1, 1024, dtype=torch.float16, device="cuda")
    f = lambda: ops.quant_linear(x, p.qweight, p.scales, p.zeros, None, 4, gs)  # noqa: E731
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        f()  # warm up (compile) outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = f()
    x.copy_(torch.randn(1, 1024, dtype=torch.float16))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(y, x.double().cpu() @ w_t) < TOL[torch.float16]


@pytest.mark.gpu
def test_gpu_split_k_reduce_back_to_back():
    """The in-kernel split-K reduction under real concurrency: 20 launches per shape queued without a sync
    (the tile's programs race for their tickets), every output right, workspace and counters back at zero."""
    _gpu()
    # the second layer has 67 column tiles of 256: stream-K picks at M <= 32 on a 132-SM GPU
    for n, k, ms in ((4104, 4096, (1, 3, 16, 40)), (16904, 1024, (4, 16, 32))):
        _back_to_back(n, k, ms)


def _back_to_back(n: int, k: int, ms) -> None:
    from lowbit.kernels.triton import splitk

    codes, zeros, scales, gs, w_t = random_layer(n, k, 4, 128, False, seed=5)
    p = gptq_packed(codes, zeros, scales, 4, gs, 0, "cuda")
    for m in ms:
        x = torch.randn(m, k).half()
        ref = (x.double().cuda() @ w_t.cuda()).cpu()
        outs = [torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda") for _ in range(20)]
        for out in outs:
            quant_matmul(x.cuda(), p, out=out)
        torch.cuda.synchronize()
        for out in outs:
            assert rel_err(out, ref) < TOL[torch.float16], m
        ws, counters = splitk._workspaces[torch.device("cuda", 0)]
        assert not ws.any() and not counters.any(), m


@pytest.mark.gpu
def test_gpu_cuda_graph_split_k_fallback():
    """Capturing a split-K launch before any workspace exists: the capture takes the zero-fill + cast path
    (no allocation inside the graph), and the replay is right."""
    _gpu()
    from lowbit.kernels.triton import splitk

    codes, zeros, scales, gs, w_t = random_layer(2056, 1024, 4, 128, False, seed=6)
    p = gptq_packed(codes, zeros, scales, 4, gs, 0, "cuda")
    x = torch.randn(4, 1024, dtype=torch.float16, device="cuda")
    quant_matmul(x, p, in_kernel_reduce=False)  # compile outside capture
    dev = torch.device("cuda", 0)
    if dev in splitk._workspaces:  # graphs captured by earlier tests may still hold it: retire, never free
        splitk._retired.append(splitk._workspaces.pop(dev))
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(graph):
        y = quant_matmul(x, p)
    torch.cuda.current_stream().wait_stream(s)
    assert dev not in splitk._workspaces, "a workspace was allocated during capture"
    x.copy_(torch.randn(4, 1024, dtype=torch.float16))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(y, x.double().cpu() @ w_t) < TOL[torch.float16]


@pytest.mark.gpu
def test_gpu_cuda_graph_dequant_slabs_overlapped():
    """Large M's slabbed dequantize + cuBLAS with the side stream, captured in a CUDA graph and replayed on
    new input (the fork/join must be capturable), and run twice eagerly back to back (buffer reuse)."""
    _gpu()
    from lowbit.kernels.triton.dequant_gemm import DequantGemm

    n, k = 1000, 512
    codes, zeros, scales, gs, w_t = random_layer(n, k, 4, 128, False, seed=8)
    p = gptq_packed(codes, zeros, scales, 4, gs, 0, "cuda")
    plan = DequantGemm(128, overlap=True)
    x = torch.randn(300, k, dtype=torch.float16, device="cuda")
    a, b = quant_matmul(x, p, config=plan), quant_matmul(x * 2, p, config=plan)
    torch.cuda.synchronize()
    assert rel_err(a, x.double().cpu() @ w_t) < TOL[torch.float16]
    assert rel_err(b, 2 * x.double().cpu() @ w_t) < TOL[torch.float16]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(graph):
        y = quant_matmul(x, p, config=plan)
    torch.cuda.current_stream().wait_stream(s)
    x.copy_(torch.randn(300, k, dtype=torch.float16))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(y, x.double().cpu() @ w_t) < TOL[torch.float16]


@pytest.mark.gpu
def test_gpu_auto_slabs_only_under_capture(monkeypatch):
    """A table's slabs (dequantize + cuBLAS in 2048-column slabs) run inside a CUDA graph; called eagerly, quant_matmul takes the
    whole weight instead (r35: the slabs' launches outran the GPU there). Both answers match the reference."""
    _gpu()
    from lowbit.kernels.triton import matmul
    from lowbit.kernels.triton.dequant_gemm import DequantGemm

    n, k, m = 8192, 256, 1024
    codes, zeros, scales, gs, w_t = random_layer(n, k, 4, 128, False, seed=12)
    p = gptq_packed(codes, zeros, scales, 4, gs, 0, "cuda")
    monkeypatch.setattr(matmul, "pick_config", lambda *args, **kw: DequantGemm(2048, overlap=True))  # a table's slab entry
    plans = []
    real = matmul.dequant_gemm
    monkeypatch.setattr(matmul, "dequant_gemm", lambda x, p, bias, out, plan: plans.append(plan) or real(x, p, bias, out, plan))
    x = torch.randn(m, k, dtype=torch.float16, device="cuda")
    a = quant_matmul(x, p)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(graph):
        y = quant_matmul(x, p)
    torch.cuda.current_stream().wait_stream(s)
    graph.replay()
    torch.cuda.synchronize()
    assert plans == [DequantGemm(), DequantGemm(2048, overlap=True)]
    for out in (a, y):
        assert rel_err(out, x.double().cpu() @ w_t) < TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.multigpu
def test_gpu_other_device_than_current():
    """Weight and input on cuda:1 while cuda:0 is current: the launch must follow the weight."""
    _gpu(2)
    from lowbit.kernels.linear import QuantLinear

    n, k, gs = 256, 512, 128
    codes, zeros, scales, gs, w_t = random_layer(n, k, 4, gs, False, seed=2)
    layer = QuantLinear(k, n, 4, gs)
    layer.qweight.copy_(pack_bitstream(codes, 4, dim=0))
    layer.qzeros.copy_(pack_bitstream(zeros, 4, dim=1))
    layer.scales.copy_(scales)
    layer = layer.to("cuda:1")
    torch.cuda.set_device(0)
    for m in (1, 300, 2048):  # split-K, GEMM and dequantize + cuBLAS
        x = torch.randn(m, k, dtype=torch.float16)
        out = layer(x.to("cuda:1"))
        assert out.device == torch.device("cuda:1")
        assert rel_err(out, x.double() @ w_t) < TOL[torch.float16]
