"""4-bit fused matmul with the weight as the tensor cores' register operand ("swap AB"), for M >= 17.

    out^T [N, M] = Wdq [N, K] @ x^T [K, M]        (Wdq[n, k] = (q - z) * s, rounded once to x's dtype)

Hopper's wgmma reads its B operand from shared memory only, but its A operand may come from registers. The
dot kernel of matmul.py unpacks the codes in registers and so has to store them to shared memory for every
chunk (B = the weight; A = x); here the weight is A: the 8 code-position tiles of unpack4.py (two codes per
instruction) go straight into the wgmma's A registers, and only x, loaded as it is, goes through shared
memory. The wgmma's 64-row side is the weight's columns, so a tile of 16-256 tokens still fills it (the dot
kernel's 16-row x tiles run mma at a quarter of wgmma's rate).

Column order: the tile of a 128-deep chunk is the 8 unpacked tiles [BN, 16] side by side, column j*16 + r
holding k = 8r + j (GPTQ packs 8 consecutive k per word). In that order each 16-column wgmma step reads one
code position, and the fp16x2 pairs unpack4 produces (rows r, r+1 of one word column) are already the pairs
the A register layout holds: no shuffle, no shared-memory round trip (SASS, Triton 3.6, sm_90: one
HGMMA.64xBMx16 per position with A in registers, 8 in flight). x is permuted to match inside the kernel
([BM, 128] -> [BM, 16, 8] -> [BM, 8, 16]: register moves before the shared-memory store it needs anyway),
or, with X_PERMUTED, once per call in torch (then the kernel's x loads are plain cp.async copies).

The scale is folded into A (one HMUL2 per two codes) so the K loop is one accumulating dot per chunk that
stays asynchronous across iterations; the dequantized weight is rounded to x's dtype once, as in
dequantize + cuBLAS. Needs 4 bits and one group per 128-deep chunk (g128, g256, ..., per-channel); K splits
meet through splitk.py like the other kernels. fp32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..repack import Packed
from . import device_guard, interpreting
from . import splitk
from .splitk import finish_tile
from .unpack4 import unpack4_dot_operands

CHUNK = 128  # K per loop step: 16 packed rows, one group at most


def eligible(p: Packed, k: int) -> bool:
    """4 bits with one group per 128-deep chunk: the codes' scale and zero are per weight column within a chunk."""
    return p.bits == 4 and (p.group_size >= k or p.group_size % CHUNK == 0)


def permute_x(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] (K % 128 == 0) -> the kernel's column order: column c*128 + j*16 + r holds k = c*128 + 8r + j."""
    m, k = x.shape
    return x.reshape(m, k // CHUNK, 16, 8).transpose(2, 3).reshape(m, k)  # (reshape: x rows may be strided)


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr):
    """acc + a @ b; DOT_F32 (bf16 under TRITON_INTERPRET=1 only, whose bf16 tl.dot is wrong) in exact fp32."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _swap_kernel(
    # x [M, K] (with X_PERMUTED already in the kernel's column order), qweight [K/8, N] int32, scales / zeros
    # [G, N], bias [N], out [M, N]; fp32 split-K workspace [M, N] and per-tile counters (splitk.py)
    x_ptr, qw_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, ws_ptr, counter_ptr,
    M, N, K, chunks_per_split, n_splits, stride_xm, stride_om,
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr, ASM: tl.constexpr, DOT_F32: tl.constexpr,
    X_PERMUTED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_N: tl.constexpr,
):
    BLOCK_K: tl.constexpr = 128
    R: tl.constexpr = 16  # packed rows per chunk
    # axis 0: output tiles, GROUP_N weight-column tiles side by side over every token tile (the weight tiles
    # stay in L2 while the token tiles pass); axis 1: the K split
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    num_m = tl.cdiv(M, BLOCK_M)
    width = GROUP_N * num_m
    first_n = (pid // width) * GROUP_N
    cols = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % width) % cols
    pid_m = (pid % width) // cols
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] weight columns = acc rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] tokens = acc columns
    n_ok = offs_n < N
    m_ok = offs_m < M
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    c_start = pid_k * chunks_per_split
    c_end = tl.minimum(c_start + chunks_per_split, tl.cdiv(K, BLOCK_K))
    # launch() makes every split non-empty; saying so (trip count >= 1) removes the loop's zero-trip path, whose
    # `acc = 0` on the way to the final wgmma wait makes ptxas serialise every wgmma (C7515: "non wgmma
    # instructions defining accumulator registers"): with it, each HGMMA waited for the one before (r26)
    for i in range(0, tl.maximum(c_end - c_start, 1)):
        c = c_start + i
        offs_w = c * R + tl.arange(0, R)  # packed rows [R]
        # words transposed, [BN, R]: the weight column is the wgmma's row; out-of-range k reads code 0 / x 0
        if X_PERMUTED:  # K % 128 == 0: no k mask
            words = tl.load(qw_ptr + offs_w[None, :] * N + offs_n[:, None], mask=n_ok[:, None], other=0)
        else:
            words = tl.load(qw_ptr + offs_w[None, :] * N + offs_n[:, None], mask=n_ok[:, None] & (offs_w[None, :] < K // 8), other=0)
        g = (c * BLOCK_K) // GROUP_SIZE  # this chunk's group
        s = tl.load(scales_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(DTYPE)  # [BN]
        z = tl.load(zeros_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)  # [BN]
        q0, q1, q2, q3, q4, q5, q6, q7 = unpack4_dot_operands(words, z, DTYPE, ASM, True)  # [BN, R] each: q_j - z
        qj = tl.join(tl.join(tl.join(q0, q4), tl.join(q2, q6)), tl.join(tl.join(q1, q5), tl.join(q3, q7)))  # [BN, R, 2, 2, 2]: j = 4a + 2b + c
        a = tl.reshape(tl.permute(qj, (0, 2, 3, 4, 1)), (BLOCK_N, BLOCK_K))  # [BN, BK], column j*R + r
        if DOT_F32:  # the interpreter's bf16 arithmetic is wrong: scale in fp32, round to bf16 once
            a = (a.to(tl.float32) * s.to(tl.float32)[:, None]).to(DTYPE)
        else:
            a = a * s[:, None]
        kk = c * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
        if X_PERMUTED:  # x^T [BK, BM] in the kernel's column order already (K % 128 == 0)
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + kk[:, None], mask=m_ok[None, :], other=0.0)
        else:  # x [BM, BK] as stored, columns reordered in registers: k = 8r + j -> j*R + r
            xa = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & (kk[None, :] < K), other=0.0)
            xt = tl.trans(tl.reshape(tl.permute(tl.reshape(xa, (BLOCK_M, R, 8)), (0, 2, 1)), (BLOCK_M, BLOCK_K)))
        acc = _dot(a, xt, acc, DOT_F32)

    if HAS_BIAS:  # added once, by the split holding the tile's first chunk
        b = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, b, 0.0)[:, None]
    out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]  # [BN, BM]
    omask = n_ok[:, None] & m_ok[None, :]
    if REDUCE == 0:  # splitk.STORE
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask)
    elif REDUCE == 1:  # splitk.ATOMIC_BUFFER
        tl.atomic_add(out_ptrs, acc, mask=omask, sem="relaxed")
    else:  # splitk.IN_KERNEL
        ws_ptrs = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
        tl.atomic_add(ws_ptrs, acc, mask=omask, sem="relaxed")
        finish_tile(ws_ptrs, out_ptrs, omask, counter_ptr + pid, n_splits)


def launch(x: torch.Tensor, p: Packed, bias: torch.Tensor | None, out: torch.Tensor, cfg, in_kernel_reduce: bool) -> torch.Tensor:
    """out [M, N] = x [M, K] @ dequant(p)^T (+ bias) with a Config whose block_m is the token tile and
    block_n the weight-column tile (block_k is 128); cfg.x_permuted permutes x once per call in torch."""
    m, k = x.shape
    n = p.shape[0]
    if not eligible(p, k):
        raise ValueError(f"the swap-AB kernel reads 4 bits with one group per 128-deep chunk, not {p.bits} bits at group {p.group_size}: "
                         "use another Config")
    x_permuted = cfg.x_permuted and k % CHUNK == 0
    xk = permute_x(x) if x_permuted else x
    chunks = triton.cdiv(k, CHUNK)
    per_split = triton.cdiv(chunks, max(1, cfg.split_k))
    split = triton.cdiv(chunks, per_split)  # no empty splits
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    reduce, target, ws, counters = splitk.STORE, out, out, out
    if split > 1:
        pair = splitk.workspace(x.device, m * n, tiles) if in_kernel_reduce else None
        if pair is None:
            reduce, target = splitk.ATOMIC_BUFFER, torch.zeros(m, n, dtype=torch.float32, device=x.device)
        else:
            reduce, (ws, counters) = splitk.IN_KERNEL, pair
    with device_guard(p.qweight):
        _swap_kernel[(tiles, split)](
            xk, p.qweight, p.scales, p.zeros, bias if bias is not None else x, target, ws, counters,
            m, n, k, per_split, split, xk.stride(0), target.stride(0),
            GROUP_SIZE=p.group_size, HAS_BIAS=bias is not None, REDUCE=reduce, ASM=not interpreting(),
            DOT_F32=interpreting() and x.dtype == torch.bfloat16, X_PERMUTED=x_permuted,
            BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, GROUP_N=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **({"maxnreg": cfg.max_registers} if cfg.max_registers and not interpreting() else {}),
        )
    return out.copy_(target) if reduce == splitk.ATOMIC_BUFFER else out
