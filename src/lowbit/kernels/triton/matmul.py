"""Fused dequantize-matmul: out [M, N] = x [M, K] @ W^T [K, N], W read from `Packed` (2/4/8 bits).

One kernel, two regimes picked by `pick_config` from M:

* small M (decode, M <= 64): memory bound, so the goal is to stream the packed weight once at full
  bandwidth. The K loop is split over SPLIT_K programs per output tile (enough programs to fill the SMs
  even when N is small), partial sums meet through fp32 atomic adds (splitk.py: inside the launch, or in a
  zeroed buffer cast afterwards, per Config.in_kernel_reduce). When a K chunk lies in
  one group (group_size % BLOCK_K == 0) the scale and zero are applied *after* the dot, per chunk:
      sum_k x_k * s * (q_k - z) = s * (x . q - z * sum_k x_k)
  so the inner loop only unpacks codes (exact in fp16/bf16) and feeds tl.dot; no per-weight multiply.
* larger M: compute bound, a grouped-order tiled GEMM that dequantizes each [BLOCK_K, BLOCK_N] tile to the
  activation dtype (in fp32, one rounding) and accumulates with tl.dot; the dequantize cost is shared by
  BLOCK_M rows. For the largest M, `pick_config` may instead return None or a DequantGemm: dequantize the
  weight (dequant.py; whole or in column slabs, dequant_gemm.py) and call cuBLAS, which wins once the matmul
  dwarfs the extra weight traffic.

At 4 bits with a group per 128-deep chunk and 17-1023 tokens, `pick_config` may instead return a Config with
swap_ab: swapab.py's kernel, which puts the unpacked weight in the tensor cores' register operand.

Unpacking: a [BK*bits/32, BN] tile of int32 words holds codes for BK consecutive k. Either it is expanded
to [BK, BN] by a broadcast shift and a reshape (one dot of depth BK), or (Config.split_unpack) shifted
once per code position j, giving VALS = 32/bits tiles [BK/VALS, BN] whose rows are k = r*VALS + j, each
paired with the stride-VALS columns of x (VALS dots of depth BK/VALS, no reshape, x re-read from L1).

All accumulation is fp32.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from ..repack import Packed
from . import device_guard, interpreting
from . import gemv as _gemv
from . import smem, splitk, swapab
from .splitk import finish_tile
from .dequant import _unpack_tile
from .config import Config
from .dequant_gemm import DequantGemm, dequant_gemm
from . import table as _table
from .unpack4 import unpack4_dot_operands


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr):
    """acc + a @ b with b rounded to a's dtype first. DOT_F32 runs the product in exact fp32: only for
    bf16 under TRITON_INTERPRET=1, whose bf16 tl.dot returns garbage (Triton 3.9); the GPU never sets it."""
    if DOT_F32:  # (the interpreter also botches int -> bf16 casts, so go through fp32)
        b = b.to(tl.float32).to(a.dtype).to(tl.float32)
        return tl.dot(a.to(tl.float32), b, acc, input_precision="ieee")
    return tl.dot(a, b.to(a.dtype), acc)


@triton.jit
def load_chunk(qw_ptr, scales_ptr, zeros_ptr, c, offs_n, n_ok, N, K, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
               GROUP_PER_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Chunk c of a packed weight (qweight [K*BITS/32, N], scales / zeros [G, N], row stride N) at columns offs_n:
    the words [BLOCK_K*BITS/32, BN] (0 past K) and, with GROUP_PER_CHUNK, the chunk's one group's scale and zero
    [BN] in fp32 (else zeros: _mac loads per-k rows)."""
    R: tl.constexpr = BLOCK_K * BITS // 32  # packed rows per chunk
    offs_w = c * R + tl.arange(0, R)
    words = tl.load(qw_ptr + offs_w[:, None] * N + offs_n[None, :], mask=(offs_w[:, None] < K * BITS // 32) & n_ok[None, :], other=0)
    if GROUP_PER_CHUNK:
        g = (c * BLOCK_K) // GROUP_SIZE
        s = tl.load(scales_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        z = tl.load(zeros_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    else:
        s = tl.zeros((BLOCK_N,), dtype=tl.float32)
        z = s
    return words, s, z


@triton.jit
def _mac(acc, d, xs, x, q, kk, s, z, offs_n, n_ok, scales_ptr, zeros_ptr, N, K,
         GROUP_SIZE: tl.constexpr, GROUP_PER_CHUNK: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr, DOT_F32: tl.constexpr,
         MAGIC: tl.constexpr = False):
    """One sub-tile: x [BM, T] times codes q [T, BN] at inputs kk [T]. Returns (acc, d, xs).

    SCALE_AFTER_DOT: d += x . q and xs += sum_k x (the caller applies scale and zero once per chunk).
    Otherwise the codes are dequantized here (in fp32, rounded once to x's dtype) and acc += x @ w; with
    GROUP_PER_CHUNK the chunk's scale/zero rows s, z [BN] are given, else per-k rows are loaded.
    """
    if MAGIC:  # scale after the dot, codes -> 16-bit floats without I2F, zero folded in: d += x . (q - z)
        if x.dtype == tl.float16:  # 0x6400 is 1024.0: 1024 + q for q < 1024
            qb = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
            zb = (z + 1024.0).to(tl.float16)
        else:  # bf16, BITS <= 4: 0x4300 is 128.0, 128 + q for q < 128
            qb = (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
            zb = (z + 128.0).to(tl.bfloat16)
        d = tl.dot(x, qb - zb[None, :], d)  # q - z is an integer of at most 9 bits: exact in fp16/bf16
    elif SCALE_AFTER_DOT:
        d = _dot(x, q, d, DOT_F32)
        xs += tl.sum(x.to(tl.float32), axis=1)
    else:
        if GROUP_PER_CHUNK:
            w = (q.to(tl.float32) - z[None, :]) * s[None, :]
        else:  # groups smaller than the chunk
            group = kk // GROUP_SIZE  # [T]
            gmask = (kk[:, None] < K) & n_ok[None, :]
            sk = tl.load(scales_ptr + group[:, None] * N + offs_n[None, :], mask=gmask, other=0.0).to(tl.float32)
            zk = tl.load(zeros_ptr + group[:, None] * N + offs_n[None, :], mask=gmask, other=0.0).to(tl.float32)
            w = (q.to(tl.float32) - zk) * sk
        acc = _dot(x, w, acc, DOT_F32)
    return acc, d, xs


@triton.jit
def _qmm_kernel(
    # pointers: x [M, K], packed weight (qweight [K*BITS/32, N], scales/zeros [G, N]), bias [N], out [M, N],
    # fp32 split-K workspace [M, N] and per-tile counters (splitk.py; unused when REDUCE is STORE)
    x_ptr, qw_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, ws_ptr, counter_ptr,
    # sizes
    M, N, K, chunks_per_split, n_splits,
    # strides of the row dimension (x and out have a contiguous last dimension)
    stride_xm, stride_om,
    # meta-parameters
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr,
    GROUP_PER_CHUNK: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr, DOT_F32: tl.constexpr, SPLIT_UNPACK: tl.constexpr,
    MAGIC: tl.constexpr, UNPACK4: tl.constexpr, ASM: tl.constexpr, X_ONCE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, STREAM_K: tl.constexpr,
):
    # Axis 0 enumerates output tiles in grouped order (GROUP_M row-tiles share each weight column-tile
    # while it sits in L2); axis 1 is the K split. STREAM_K: a 1-D grid of P programs, each taking an equal
    # contiguous run of the tiles x chunks steps (tile-major), crossing tile boundaries; the programs meeting
    # in a tile reduce through splitk.py's tickets (REDUCE == IN_KERNEL), each tile counting its own.
    chunks = tl.cdiv(K, BLOCK_K)
    if STREAM_K:
        total = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N) * chunks
        n_prog = tl.num_programs(0)
        pid = tl.program_id(0)
        it = (pid * total) // n_prog
        end = ((pid + 1) * total) // n_prog
        while it < end:
            tile = it // chunks
            c0 = it - tile * chunks
            c1 = tl.minimum(chunks, c0 + (end - it))
            # programs meeting in this tile: the owners of its first and last steps (owner(i) = ceil((i+1) P / total) - 1)
            first = ((tile * chunks + 1) * n_prog + total - 1) // total - 1
            last = (((tile + 1) * chunks) * n_prog + total - 1) // total - 1
            _tile(x_ptr, qw_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, ws_ptr, counter_ptr, M, N, K, stride_xm, stride_om,
                  tile, c0, c1, c0 == 0, last - first + 1,
                  BITS, GROUP_SIZE, HAS_BIAS, REDUCE, GROUP_PER_CHUNK, SCALE_AFTER_DOT, DOT_F32, SPLIT_UNPACK, MAGIC, UNPACK4, ASM,
                  X_ONCE, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
            it += c1 - c0
    else:
        pid, pid_k = tl.program_id(0), tl.program_id(1)
        c_start = pid_k * chunks_per_split
        _tile(x_ptr, qw_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, ws_ptr, counter_ptr, M, N, K, stride_xm, stride_om,
              pid, c_start, tl.minimum(c_start + chunks_per_split, chunks), pid_k == 0, n_splits,
              BITS, GROUP_SIZE, HAS_BIAS, REDUCE, GROUP_PER_CHUNK, SCALE_AFTER_DOT, DOT_F32, SPLIT_UNPACK, MAGIC, UNPACK4, ASM,
              X_ONCE, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


@triton.jit
def _tile(
    x_ptr, qw_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, ws_ptr, counter_ptr, M, N, K, stride_xm, stride_om,
    pid, c_start, c_end, add_bias, n_splits,  # output tile (grouped order), its chunks [c_start, c_end), ...
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr,
    GROUP_PER_CHUNK: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr, DOT_F32: tl.constexpr, SPLIT_UNPACK: tl.constexpr,
    MAGIC: tl.constexpr, UNPACK4: tl.constexpr, ASM: tl.constexpr, X_ONCE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One output tile's partial sum over chunks [c_start, c_end), stored / added per REDUCE; add_bias: this
    partial carries the bias (the tile's first chunk); n_splits: how many partials the tile's ticket awaits."""
    VALS: tl.constexpr = 32 // BITS  # codes per int32 word
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    R: tl.constexpr = BLOCK_K // VALS  # packed rows per chunk
    for c in range(c_start, c_end):
        # Out-of-range k read x = 0 and codes = 0, so they add nothing on any path.
        words, s, z = load_chunk(qw_ptr, scales_ptr, zeros_ptr, c, offs_n, n_ok, N, K, BITS, GROUP_SIZE, GROUP_PER_CHUNK, BLOCK_N, BLOCK_K)
        d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # x . q of this chunk (SCALE_AFTER_DOT)
        xs = tl.zeros((BLOCK_M,), dtype=tl.float32)  # sum_k x of this chunk (SCALE_AFTER_DOT)
        if UNPACK4 and not SPLIT_UNPACK:
            # 4 bits, larger M: the 8 code-position tiles interleaved back into k order ([R, BN] x 8 ->
            # [BK, BN], row 8r + j) for one deep dot, so wide row tiles keep the tensor cores busy.
            qs = unpack4_dot_operands(words, z, x_ptr.dtype.element_ty, ASM)
            ab = tl.join(tl.join(tl.join(qs[0], qs[4]), tl.join(qs[2], qs[6])),
                         tl.join(tl.join(qs[1], qs[5]), tl.join(qs[3], qs[7])))  # [R, BN, 2, 2, 2]: j = 4t + 2u + v
            b = tl.reshape(tl.permute(ab, (0, 2, 3, 4, 1)), (BLOCK_K, BLOCK_N))
            kk = c * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & (kk[None, :] < K), other=0.0)
            d = _dot(x, b, d, DOT_F32)
        elif UNPACK4:
            # 4 bits, one group per chunk: unpack4.py turns each pair of word rows into the 8 code positions'
            # (q - z) tiles [R, BN] in one go (two codes per instruction with ASM), then one dot per position j
            # with the stride-8 columns of x, as in the split unpack below.
            qs = unpack4_dot_operands(words, z, x_ptr.dtype.element_ty, ASM)
            if X_ONCE:  # x [BM, BK] in one contiguous load, split in registers into its 8 stride-8 column sets
                kk = c * BLOCK_K + tl.arange(0, BLOCK_K)
                xa = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & (kk[None, :] < K), other=0.0)
                xe, xo = tl.split(tl.reshape(xa, (BLOCK_M, R, 2, 2, 2)))  # j = 4a + 2b + c: c = 0 / 1
                xe0, xe1 = tl.split(xe)  # b = 0 / 1
                xo0, xo1 = tl.split(xo)
                x0, x4 = tl.split(xe0)  # a = 0 / 1
                x2, x6 = tl.split(xe1)
                x1, x5 = tl.split(xo0)
                x3, x7 = tl.split(xo1)
                d = _dot(x0, qs[0], d, DOT_F32)
                d = _dot(x1, qs[1], d, DOT_F32)
                d = _dot(x2, qs[2], d, DOT_F32)
                d = _dot(x3, qs[3], d, DOT_F32)
                d = _dot(x4, qs[4], d, DOT_F32)
                d = _dot(x5, qs[5], d, DOT_F32)
                d = _dot(x6, qs[6], d, DOT_F32)
                d = _dot(x7, qs[7], d, DOT_F32)
            else:
                offs_r = tl.arange(0, R)
                for j in tl.static_range(8):
                    kk = c * BLOCK_K + offs_r * 8 + j  # [R]
                    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & (kk[None, :] < K), other=0.0)
                    d = _dot(x, qs[j], d, DOT_F32)
        elif SPLIT_UNPACK:
            # No reshape: the j-th code of every word is k = c*BK + r*VALS + j, so shift the whole word
            # tile once per j and pair it with the matching strided columns of x (VALS dots of K = R).
            offs_r = tl.arange(0, R)
            for j in tl.static_range(VALS):
                kk = c * BLOCK_K + offs_r * VALS + j  # [R]
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & (kk[None, :] < K), other=0.0)
                q = (words >> (j * BITS)) & ((1 << BITS) - 1)  # [R, BN]
                acc, d, xs = _mac(acc, d, xs, x, q, kk, s, z, offs_n, n_ok, scales_ptr, zeros_ptr, N, K,
                                  GROUP_SIZE, GROUP_PER_CHUNK, SCALE_AFTER_DOT, DOT_F32, MAGIC)
        else:
            kk = c * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & (kk[None, :] < K), other=0.0)
            q = _unpack_tile(words, BITS, BLOCK_K, BLOCK_N)  # int32 [BK, BN]
            acc, d, xs = _mac(acc, d, xs, x, q, kk, s, z, offs_n, n_ok, scales_ptr, zeros_ptr, N, K,
                              GROUP_SIZE, GROUP_PER_CHUNK, SCALE_AFTER_DOT, DOT_F32, MAGIC)
        if MAGIC or UNPACK4:
            acc += d * s[None, :]
        elif SCALE_AFTER_DOT:
            acc += (d - xs[:, None] * z[None, :]) * s[None, :]

    if HAS_BIAS:  # added once, by the partial holding the tile's first chunk
        b = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.where(add_bias, b, 0.0)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    omask = m_ok[:, None] & n_ok[None, :]
    if REDUCE == 0:  # splitk.STORE
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask)
    elif REDUCE == 1:  # splitk.ATOMIC_BUFFER: out is a zeroed fp32 buffer the K splits add into
        tl.atomic_add(out_ptrs, acc, mask=omask, sem="relaxed")
    else:  # splitk.IN_KERNEL
        ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws_ptrs, acc, mask=omask, sem="relaxed")
        finish_tile(ws_ptrs, out_ptrs, omask, counter_ptr + pid, n_splits)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def pick_config(m: int, n: int, k: int, bits: int, group_size: int, sm_count: int = 132, table: _table.Table | None = None,
                device_name: str | None = None) -> Config | DequantGemm | None:
    """Kernel choice for x [M, K] @ W^T [K, N]: a Config, a DequantGemm (dequantize + cuBLAS in column slabs)
    or None (dequantize + cuBLAS, the whole weight), from `table`, else the table of the GPU named
    `device_name` (default: the current CUDA device's; table.py: the user's tuned one, a shipped one, or the
    default, which holds the H100 choices, see tables/h100.md). Where no entry of the table can read the
    layer (bits, groups), the default table answers."""
    if table is None and device_name is None and torch.cuda.is_available():
        device_name = _device_name(torch.device("cuda", torch.cuda.current_device()))
    return _pick(m, n, k, bits, group_size, sm_count, table or _table.for_device(device_name))


@functools.lru_cache(maxsize=4096)
def _pick(m: int, n: int, k: int, bits: int, group_size: int, sm_count: int, t: _table.Table) -> Config | DequantGemm | None:
    """pick_config's answer, cached: host ints in, a frozen answer out (a few hundred ns per call after the first)."""
    try:
        return t.pick(m, n, k, bits, group_size, sm_count)
    except _table.NoEntry:
        if t is _table.default_table():
            return None  # dequantize + cuBLAS reads every layer
        return _pick(m, n, k, bits, group_size, sm_count, _table.default_table())


def gemv_config(m: int, n: int, k: int, sm_count: int = 132, block_n: int | None = None, num_warps: int | None = None,
                block_k: int | None = None) -> Config:
    """The GEMV launch (gemv.py) for m <= 4, as the tables build it: one row block holding all of M (the weight
    is read once); block_n = 128 * num_warps gives each thread 4 columns (16-byte loads) and every packed row of
    the chunk (the sum over k stays in the thread); a K split for ~8 programs per SM, each keeping >= 1 chunk.
    Register use from the SASS (Triton 3.9, sm_90): 1 row 512x64/4 warps 164 regs; 2 rows 512x64/8 warps
    128; 4 rows 512x32/8 warps 128, no spills."""
    if m > 4:
        raise ValueError(f"the GEMV takes at most 4 rows per program, not {m}")
    entry = {"kernel": "gemv", "block_n": block_n or 512, "num_warps": num_warps or 0, "block_k": block_k or 0}
    return _table.build(entry, m, n, k, 4, k, sm_count)


def quant_matmul(
    x: torch.Tensor, p: Packed, bias: torch.Tensor | None = None, config: Config | DequantGemm | None | str = "auto", out: torch.Tensor | None = None,
    in_kernel_reduce: bool | None = None,
) -> torch.Tensor:
    """out [M, N] = x [M, K] @ dequant(p) (+ bias), in x's dtype (fp16 or bf16).

    config: "auto" (pick_config), a Config, or None / a DequantGemm (dequantize + cuBLAS, whole or in slabs).
    out: optional [M, N] tensor of x's dtype to write into (tests poison it first).
    in_kernel_reduce: K splits meet inside the launch (splitk.py); False forces the zero-fill + cast path
    that CUDA-graph capture falls back to (tests run both); None: the config's choice (Config.in_kernel_reduce).
    """
    n, k = p.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"activations must be fp16 or bf16, got {x.dtype}")
    if p.bits not in (2, 4, 8):
        raise ValueError(f"the fused kernel reads 2, 4 or 8 bits, not {p.bits}")
    if x.device != p.qweight.device or (bias is not None and bias.device != x.device):
        raise ValueError(f"x on {x.device}, weight on {p.qweight.device}: move them to one device")
    if p.scales.shape != p.zeros.shape or p.scales.shape[1] != n or p.scales.shape[0] != -(-k // p.group_size):
        raise ValueError(f"scales {tuple(p.scales.shape)} / zeros {tuple(p.zeros.shape)} do not fit W [{n}, {k}] at group {p.group_size}")
    if x.stride(1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.device != x.device or out.stride(1) != 1:
        raise ValueError(f"out must be a [{m}, {n}] {x.dtype} tensor on {x.device} with a contiguous last dimension")
    if isinstance(config, str):
        config = pick_config(m, n, k, p.bits, p.group_size, _sm_count(x.device), device_name=_device_name(x.device))
        if isinstance(config, DequantGemm) and config.slab_n and x.is_cuda and not torch.cuda.is_current_stream_capturing():
            # The slabs win inside a CUDA graph only: launched call by call (eager prefill), their ~4 launches
            # per slab cost more host time than the GPU spends on a slab (H100 r35, eager, M = 1024:
            # 0.25-0.54x fp16 on 8192x28672 and 0.22-0.29x on 4096x14336 against 0.74x for the whole weight)
            config = DequantGemm()
        if isinstance(config, Config) and not (config.gemv or config.swap_ab or config.split_unpack):
            # the picked tile at fewer stages where it would not fit the device's shared memory: per-k scale and
            # zero tiles (groups smaller than the chunk) made a 4-bit g32 [32 x 128 x 128] tile at 4 stages need
            # 278528 bytes on the H200 (limit 232448; a tiny Qwen3-MoE's attention prefill, OutOfResources)
            per_k = not (p.group_size >= k or p.group_size % config.block_k == 0)
            stages = smem.fit_stages(config.block_m, config.block_n, config.block_k, p.bits, config.num_stages, per_k,
                                     smem.max_shared(x.device))
            if stages != config.num_stages:
                config = dataclasses.replace(config, num_stages=stages)
    if config is None or isinstance(config, DequantGemm):
        return dequant_gemm(x, p, bias, out, config or DequantGemm())

    cfg = config
    if cfg.swap_ab:
        if in_kernel_reduce is None:
            in_kernel_reduce = cfg.in_kernel_reduce
        return swapab.launch(x, p, bias, out, cfg, in_kernel_reduce)
    if cfg.gemv:
        bk = _gemv.gemv_block_k(p.bits, p.group_size, k, cfg.block_k)
        if bk is None:  # group size the GEMV cannot chunk: the split-unpack dot path instead
            cfg = Config(16, 128, 512 // p.bits, split_k=cfg.split_k, num_warps=4, num_stages=4, split_unpack=True)
        elif bk != cfg.block_k:
            cfg = dataclasses.replace(cfg, block_k=bk, split_k=cfg.split_k * (cfg.block_k // bk))
    if cfg.split_unpack and x.is_cuda and cfg.block_k * p.bits // 32 < 16:
        raise ValueError(f"split_unpack needs block_k * bits / 32 >= 16 (tl.dot's smallest K), got block_k={cfg.block_k}")
    gs_whole = p.group_size >= k  # one group (per-channel): every chunk lies in it
    group_per_chunk = gs_whole or p.group_size % cfg.block_k == 0
    chunks = triton.cdiv(k, cfg.block_k)
    per_split = triton.cdiv(chunks, cfg.split_k)
    split = triton.cdiv(chunks, per_split)  # no empty splits
    dot_f32 = interpreting() and x.dtype == torch.bfloat16
    scale_after = cfg.scale_after_dot and group_per_chunk
    magic = cfg.magic and scale_after and not dot_f32 and (x.dtype == torch.float16 or p.bits <= 4)
    # unpack4.py's path: 4 bits, one group per chunk, whole words per chunk row; otherwise the config's other flags
    unpack4 = cfg.unpack4 and p.bits == 4 and scale_after and cfg.block_k % 16 == 0
    if unpack4 and cfg.split_unpack and x.is_cuda and cfg.block_k < 128:
        raise ValueError(f"split unpack4 needs block_k >= 128 (16 packed rows, tl.dot's smallest K), got block_k={cfg.block_k}")
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    grid = (tiles, split)
    stream_k = cfg.stream_k > 0 and not cfg.gemv
    if stream_k:  # P programs sharing tiles x chunks steps evenly (Config.stream_k per SM)
        grid = (min(cfg.stream_k * _sm_count(x.device), tiles * chunks),)
        split = grid[0]  # > 1 (unless one step in all): the partials always go through a reduction
    if cfg.gemv:
        grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, cfg.block_m))
    # With a K split the partial sums meet in splitk.py's persistent workspace and the launch's last program
    # per tile writes `out`; otherwise (the config says so, or a CUDA graph is being captured and the workspace
    # would have to grow) in a zeroed fp32 buffer, cast into `out` after the launch.
    reduce, target, ws, counters = splitk.STORE, out, out, out
    if split > 1:
        if in_kernel_reduce is None:
            in_kernel_reduce = cfg.in_kernel_reduce
        pair = splitk.workspace(x.device, m * n, grid[0] * grid[2] if cfg.gemv else tiles) if in_kernel_reduce else None
        if pair is None:
            reduce, target = splitk.ATOMIC_BUFFER, torch.zeros(m, n, dtype=torch.float32, device=x.device)
        else:
            reduce, (ws, counters) = splitk.IN_KERNEL, pair
    with device_guard(p.qweight):
        if cfg.gemv:
            _gemv.launch(x, p, bias, target, ws, counters, cfg, per_split, split, reduce, grid)
        else:
            _qmm_kernel[grid](
                x, p.qweight, p.scales, p.zeros, bias if bias is not None else x, target, ws, counters,
                m, n, k, per_split, split,
                x.stride(0), target.stride(0),
                BITS=p.bits, GROUP_SIZE=p.group_size, HAS_BIAS=bias is not None, REDUCE=reduce,
                GROUP_PER_CHUNK=group_per_chunk, SCALE_AFTER_DOT=scale_after,
                DOT_F32=dot_f32, SPLIT_UNPACK=cfg.split_unpack, MAGIC=magic, UNPACK4=unpack4, ASM=not interpreting(), X_ONCE=cfg.x_once,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, STREAM_K=stream_k,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                **({"maxnreg": cfg.max_registers} if cfg.max_registers and not interpreting() else {}),
            )
    return out.copy_(target) if reduce == splitk.ATOMIC_BUFFER else out
