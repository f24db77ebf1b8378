"""GPTQ's column loop for one lazy block, fused: one launch instead of ~10 small launches per column.

GPTQ (algorithms/gptq.py) rounds the columns of a lazy block of B <= 128 columns one after another; each
column's error moves the columns after it. Every output row is independent of the others given the
Hessian factor U, so one program owns BLOCK_N rows and walks the B columns in registers:

    x = W[:, i]                     (the column, read out of the register tile by a masked sum)
    q = clamp(rint(x / s_i) + z_i, 0, maxq)
    e = (x - s_i (q - z_i)) / U[i, i]
    W[:, j] -= e U[i, j]  for j >= i  (U is upper triangular: U[i, j < i] = 0)

and writes q and e per column. On a GPU the torch loop is bound by launch latency (K columns x ~10
kernels on vectors of N floats); this kernel makes the solve of a 4096 x 14336 layer a few milliseconds.
The torch loop (`algorithms.gptq.solve_columns`) is the reference it is tested against (under
TRITON_INTERPRET=1 on the CPU) and what runs on the CPU.

Exactness: the division and the rounding are IEEE round-to-nearest(-even) (`div_rn`, `_rint`, as torch),
and the launch disables FMA contraction, so each operation rounds as torch's separate kernels do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import device_guard

RINT_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: adding it leaves no fraction bits, so the add rounds to an integer


@triton.jit
def _rint(x):
    """Round to nearest, ties to even (torch.round), for |x| < 2**22: the add rounds at integer precision
    in the current (round-to-nearest-even) mode and the subtraction is exact."""
    return (x + RINT_MAGIC) - RINT_MAGIC


@triton.jit
def _gptq_columns_kernel(
    # pointers: W [L, N, B] fp32 (read), U [L, B, B] fp32 upper triangular, S / Z [L, N, B] per column (a
    # column stride of 0 broadcasts one group's values), Q / E [L, N, B] fp32 outputs (codes, scaled errors);
    # L linears solved at once (the experts of a block), one per program column of the grid
    w_ptr, u_ptr, s_ptr, z_ptr, q_ptr, e_ptr,
    # sizes
    N, B,
    # strides (elements): linear, row, column
    stride_wl, stride_wn, stride_wb, stride_ul, stride_ub0, stride_ub1, stride_sl, stride_sn, stride_sb,
    stride_zl, stride_zn, stride_zb, stride_ql, stride_qn, stride_qb, stride_el, stride_en, stride_eb,
    # the grid's top code
    maxq,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
):
    lin = tl.program_id(1)
    w_ptr += lin * stride_wl
    u_ptr += lin * stride_ul
    s_ptr += lin * stride_sl
    z_ptr += lin * stride_zl
    q_ptr += lin * stride_ql
    e_ptr += lin * stride_el
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    cols = tl.arange(0, BLOCK_B)  # [BB]
    r_ok, c_ok = rows < N, cols < B
    w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :] * stride_wb, mask=r_ok[:, None] & c_ok[None, :], other=0.0)  # [BN, BB]
    for i in range(0, B):
        x = tl.sum(tl.where(cols[None, :] == i, w, 0.0), axis=1)  # [BN] column i as updated so far
        s = tl.load(s_ptr + rows * stride_sn + i * stride_sb, mask=r_ok, other=1.0)
        z = tl.load(z_ptr + rows * stride_zn + i * stride_zb, mask=r_ok, other=0.0)
        q = _rint(tl.math.div_rn(x, s)) + z
        q = tl.minimum(tl.maximum(q, 0.0), maxq)
        d = x - s * (q - z)
        u_ii = tl.load(u_ptr + i * stride_ub0 + i * stride_ub1)
        e = tl.math.div_rn(d, u_ii)  # [BN]
        u_row = tl.load(u_ptr + i * stride_ub0 + cols * stride_ub1, mask=c_ok & (cols >= i), other=0.0)  # [BB]
        w = w - e[:, None] * u_row[None, :]
        tl.store(q_ptr + rows * stride_qn + i * stride_qb, q, mask=r_ok)
        tl.store(e_ptr + rows * stride_en + i * stride_eb, e, mask=r_ok)


MAX_COLUMNS = 128  # one lazy block at most: the register tile is [BLOCK_N, 128] fp32
BLOCK_N = 16  # rows per program: 16 x 128 fp32 = 8 KiB of registers over 4 warps


def gptq_columns(w: torch.Tensor, u: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scaled errors of B columns of L linears: w [L, N, B], u [L, B, B], s / z [L, N, B] (views
    with any strides, a column stride of 0 included), all float32 on one device. Returns (q, e) [L, N, B]
    float32."""
    nl, n, b = w.shape
    if b > MAX_COLUMNS:
        raise ValueError(f"gptq_columns takes at most {MAX_COLUMNS} columns, got {b}")
    if not (w.dtype == u.dtype == s.dtype == z.dtype == torch.float32):
        raise ValueError("gptq_columns needs float32 tensors")
    q = torch.empty(nl, n, b, device=w.device, dtype=torch.float32)
    e = torch.empty_like(q)
    grid = (triton.cdiv(n, BLOCK_N), nl)
    with device_guard(w):
        _gptq_columns_kernel[grid](
            w, u, s, z, q, e, n, b,
            *w.stride(), *u.stride(), *s.stride(), *z.stride(), *q.stride(), *e.stride(), float(maxq),
            BLOCK_N=BLOCK_N, BLOCK_B=MAX_COLUMNS, enable_fp_fusion=False,
        )
    return q, e
