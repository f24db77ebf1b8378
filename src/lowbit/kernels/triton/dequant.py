"""Dequantize kernel: Packed (2/4/8 bits) -> W^T [K, N] in the activation dtype.

Used for large M, where dequantize + cuBLAS can beat a fused kernel, and by tests. One program writes a
[BLOCK_K, BLOCK_N] tile of W^T; it reads BLOCK_K * bits / 32 rows of packed words for the same columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..repack import Packed
from . import device_guard, interpreting
from .unpack4 import unpack4_dot_operands


@triton.jit
def _unpack_tile(words, BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """int32 words [BLOCK_K * BITS / 32, BLOCK_N] -> int32 codes [BLOCK_K, BLOCK_N].

    Word r holds codes k = r * VALS + j at bits [j * BITS, (j + 1) * BITS): shifting a [R, 1, BN] view by
    [1, VALS, 1] shifts gives [R, VALS, BN], whose row-major flattening is exactly k order.
    """
    VALS: tl.constexpr = 32 // BITS
    shifts = tl.arange(0, VALS) * BITS  # [VALS]
    codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)  # [R, VALS, BN]
    return tl.reshape(codes, (BLOCK_K, BLOCK_N))


@triton.jit
def _dequant_kernel(
    # pointers
    qw_ptr, scales_ptr, zeros_ptr, out_ptr,
    # sizes: the layer's N and K; columns [n0, n0 + n_cols) are written to out [K, n_cols] (row stride n_cols)
    N, K, n0, n_cols,
    # meta-parameters
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    VALS: tl.constexpr = 32 // BITS
    pid_k, pid_n = tl.program_id(0), tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] columns of out
    offs_n = n0 + offs_c  # [BN] columns of the layer
    offs_w = pid_k * (BLOCK_K // VALS) + tl.arange(0, BLOCK_K // VALS)  # packed rows [BK / VALS]
    n_ok = offs_c < n_cols
    k_ok = offs_k < K
    words = tl.load(qw_ptr + offs_w[:, None] * N + offs_n[None, :], mask=(offs_w[:, None] < K // VALS) & n_ok[None, :], other=0)
    codes = _unpack_tile(words, BITS, BLOCK_K, BLOCK_N).to(tl.float32)  # [BK, BN]
    group = offs_k // GROUP_SIZE  # [BK]
    gmask = k_ok[:, None] & n_ok[None, :]
    s = tl.load(scales_ptr + group[:, None] * N + offs_n[None, :], mask=gmask, other=0).to(tl.float32)
    z = tl.load(zeros_ptr + group[:, None] * N + offs_n[None, :], mask=gmask, other=0).to(tl.float32)
    w = (codes - z) * s
    tl.store(out_ptr + offs_k[:, None] * n_cols + offs_c[None, :], w.to(out_ptr.dtype.element_ty), mask=gmask)


@triton.jit
def _dequant4_kernel(
    # pointers
    qw_ptr, scales_ptr, zeros_ptr, out_ptr,
    # sizes: as _dequant_kernel
    N, K, n0, n_cols,
    # meta-parameters
    GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, ASM: tl.constexpr,
):
    """4 bits, one group per 128 rows of k: unpack4.py's two-codes-per-instruction unpack gives the 8 code
    positions j as tiles [16, BN] of (q - z) in out's dtype; tile j is rows k = 8r + j of the chunk, stored
    as is (each row BN contiguous columns), so no reordering into k order is needed."""
    R: tl.constexpr = 16  # packed rows per 128-deep chunk
    pid_k, pid_n = tl.program_id(0), tl.program_id(1)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] columns of out
    offs_n = n0 + offs_c
    offs_r = pid_k * R + tl.arange(0, R)  # [R] packed rows
    n_ok = offs_c < n_cols
    mask = (offs_r[:, None] < K // 8) & n_ok[None, :]
    words = tl.load(qw_ptr + offs_r[:, None] * N + offs_n[None, :], mask=mask, other=0)
    g = (pid_k * 128) // GROUP_SIZE
    s = tl.load(scales_ptr + g * N + offs_n, mask=n_ok, other=0.0)  # [BN]
    z = tl.load(zeros_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    qs = unpack4_dot_operands(words, z, DTYPE, ASM)
    rows = out_ptr + (offs_r[:, None] * 8) * n_cols + offs_c[None, :]  # row k = 8r of each packed row
    for j in tl.static_range(8):
        if scales_ptr.dtype.element_ty == DTYPE:  # q - z and s exact in DTYPE: one correctly rounded product
            w = qs[j] * s[None, :]
        else:  # (fp16 scales, bf16 out): multiply in fp32, round once
            w = (qs[j].to(tl.float32) * s.to(tl.float32)[None, :]).to(DTYPE)
        tl.store(rows + j * n_cols, w, mask=mask)


def dequantize(p: Packed, dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None, cols: tuple[int, int] | None = None) -> torch.Tensor:
    """W^T [K, N] in `dtype` (fp16, bf16 or fp32), written into `out` if given.

    cols=(n0, n_cols): only columns n0 .. n0 + n_cols - 1, as a [K, n_cols] tensor (dequant_gemm.py's slabs).
    """
    n, k = p.shape
    n0, n_cols = cols if cols is not None else (0, n)
    if p.bits not in (2, 4, 8):
        raise ValueError(f"the Triton dequantize kernel packs 2, 4 or 8 bits, not {p.bits}")
    if not (p.qweight.is_contiguous() and p.scales.is_contiguous() and p.zeros.is_contiguous()):
        raise ValueError("Packed tensors must be contiguous")
    if not (0 <= n0 and 0 < n_cols and n0 + n_cols <= n):
        raise ValueError(f"cols {cols} are not a column range of W [{n}, {k}]")
    if out is None:
        out = torch.empty(k, n_cols, dtype=dtype, device=p.qweight.device)
    elif out.shape != (k, n_cols) or out.dtype != dtype or not out.is_contiguous() or out.device != p.qweight.device:
        raise ValueError(f"out must be a contiguous [{k}, {n_cols}] {dtype} tensor on {p.qweight.device}")
    gs_ok = p.group_size >= k or p.group_size % 128 == 0  # one group per 128-deep chunk
    if p.bits == 4 and gs_ok and dtype in (torch.float16, torch.bfloat16) and k % 8 == 0:
        block_n = 256
        grid = (triton.cdiv(k, 128), triton.cdiv(n_cols, block_n))
        with device_guard(p.qweight):
            _dequant4_kernel[grid](p.qweight, p.scales, p.zeros, out, n, k, n0, n_cols,
                                   GROUP_SIZE=p.group_size,
                                   BLOCK_N=block_n, ASM=not interpreting(), num_warps=4)
        return out
    block_k, block_n = 64, 128
    grid = (triton.cdiv(k, block_k), triton.cdiv(n_cols, block_n))
    with device_guard(p.qweight):
        _dequant_kernel[grid](p.qweight, p.scales, p.zeros, out, n, k, n0, n_cols,
                              BITS=p.bits, GROUP_SIZE=p.group_size, BLOCK_K=block_k, BLOCK_N=block_n)
    return out
