"""Dequantize kernel: Packed (2/4/8 bits) -> W^T [K, N] in the activation dtype.

Used for large M, where dequantize + cuBLAS can beat a fused kernel, and by tests. One program writes a
[BLOCK_K, BLOCK_N] tile of W^T; it reads BLOCK_K * bits / 32 rows of packed words for the same columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..repack import Packed
from . import device_guard


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
    # sizes
    N, K,
    # meta-parameters
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    VALS: tl.constexpr = 32 // BITS
    pid_k, pid_n = tl.program_id(0), tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_w = pid_k * (BLOCK_K // VALS) + tl.arange(0, BLOCK_K // VALS)  # packed rows [BK / VALS]
    n_ok = offs_n < N
    k_ok = offs_k < K
    words = tl.load(qw_ptr + offs_w[:, None] * N + offs_n[None, :], mask=(offs_w[:, None] < K // VALS) & n_ok[None, :], other=0)
    codes = _unpack_tile(words, BITS, BLOCK_K, BLOCK_N).to(tl.float32)  # [BK, BN]
    group = offs_k // GROUP_SIZE  # [BK]
    gmask = k_ok[:, None] & n_ok[None, :]
    s = tl.load(scales_ptr + group[:, None] * N + offs_n[None, :], mask=gmask, other=0).to(tl.float32)
    z = tl.load(zeros_ptr + group[:, None] * N + offs_n[None, :], mask=gmask, other=0).to(tl.float32)
    w = (codes - z) * s
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=gmask)


def dequantize(p: Packed, dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None) -> torch.Tensor:
    """W^T [K, N] in `dtype` (fp16, bf16 or fp32), written into `out` if given."""
    n, k = p.shape
    if p.bits not in (2, 4, 8):
        raise ValueError(f"the Triton dequantize kernel packs 2, 4 or 8 bits, not {p.bits}")
    if not (p.qweight.is_contiguous() and p.scales.is_contiguous() and p.zeros.is_contiguous()):
        raise ValueError("Packed tensors must be contiguous")
    if out is None:
        out = torch.empty(k, n, dtype=dtype, device=p.qweight.device)
    elif out.shape != (k, n) or out.dtype != dtype or not out.is_contiguous() or out.device != p.qweight.device:
        raise ValueError(f"out must be a contiguous [{k}, {n}] {dtype} tensor on {p.qweight.device}")
    block_k, block_n = 64, 128
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n))
    with device_guard(p.qweight):
        _dequant_kernel[grid](p.qweight, p.scales, p.zeros, out, n, k, BITS=p.bits, GROUP_SIZE=p.group_size, BLOCK_K=block_k, BLOCK_N=block_n)
    return out

