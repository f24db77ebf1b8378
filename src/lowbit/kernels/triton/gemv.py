"""Small-M (decode) path without tensor cores: dequantize in registers, multiply-add in fp32.

out [M, N] = x [M, K] @ W^T [K, N] for M up to a few rows, where the weight must be streamed once at full
memory bandwidth and every instruction per weight code counts (235 M codes for 8192x28672: at 128 lanes
per SM and clock an H100 issues ~30 T instructions/s, so 4 instructions per code already cost ~32 µs of
the ~47 µs the packed weight takes to read).

Per program: BLOCK_N output columns, BLOCK_M rows of x, a range of K chunks (split-K; partial sums meet in
fp32 atomic adds, splitk.py). Each chunk is one [BLOCK_K * BITS / 32, BLOCK_N] tile of int32 words
(rows contiguous along N: coalesced 16-byte loads) and lies in one quantization group, so the scale is
applied once per chunk: acc += s * sum_k x_k (q_k - z).

Unpacking without int->float conversions (I2F issues at a quarter of the FMA rate): a code q placed in the
mantissa of 2^23 (bits 0x4B000000 | q) is the float 2^23 + q, and subtracting 2^23 + z gives q - z exactly.
The shift is skipped too: with the mask 0xF << 4j the word already holds q * 2^(4j) in place, so
(word & (MASK << j*BITS)) | 0x4B000000 is 2^23 + q * 2^(j*BITS), exact while q * 2^(j*BITS) < 2^23, true for
the codes in the low 16 bits of a word at any width (2, 4, 8 bits). Subtracting 2^23 + z * 2^(j*BITS) (a
per-column constant per chunk and j) gives (q - z) * 2^(j*BITS) exactly; the power of two is undone on x
(exact). The high 16 bits take one shift per word. Per code: one LOP3, one FADD, BLOCK_M FFMA.

The products are accumulated per (row, packed row, column) in registers ([R, BLOCK_N] per row of x) and
reduced over the packed rows once at the end. With BLOCK_N = 128 * num_warps Triton's default layout gives
each thread 4 columns (16-byte loads) and all R packed rows, so that reduction stays inside the thread, and x
loaded as [R, 1] is broadcast along N without a layout conversion (checked in the SASS, Triton 3.9, sm_90:
no shared memory, no spills at 1 row, 512x64, 4 warps). BLOCK_M is 1, 2 or 4 (one accumulator per row);
the kernel tables use it at M = 1 only (tables/h100.md, `GEMV_MAX_M`, has the measurements).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .splitk import finish_tile

MAGIC_BITS = tl.constexpr(0x4B000000)  # float32 2^23
MAGIC = tl.constexpr(8388608.0)


@triton.jit
def _xrow(x_ptr, row, kk, ok, PLACE: tl.constexpr):
    """x[row, kk] in fp32 times 2^-PLACE (exact), 0 where not ok; kk/ok are [R, 1]."""
    v = tl.load(x_ptr + row + kk, mask=ok, other=0.0).to(tl.float32)
    return v * (1.0 / (1 << PLACE))


@triton.jit
def _gemv_kernel(
    # pointers: x [M, K], packed weight (qweight [K*BITS/32, N], scales/zeros [G, N]), bias [N], out [M, N]
    # fp32 split-K workspace [M, N] and per-tile counters (splitk.py; unused when REDUCE is STORE)
    x_ptr, qw_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, ws_ptr, counter_ptr,
    M, N, K, chunks_per_split, n_splits,
    stride_xm, stride_om,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # BLOCK_M is 1, 2 or 4: one accumulator per row, written out (no 3D tensors: the [R, BN] word tile keeps
    # the compiler's default layout, and with BLOCK_N = 128 * num_warps each thread holds all R packed rows
    # of its 4 columns, so the sum over k stays inside the thread).
    VALS: tl.constexpr = 32 // BITS  # codes per int32 word
    HALF: tl.constexpr = VALS // 2  # codes per 16-bit half word
    R: tl.constexpr = BLOCK_K // VALS  # packed rows per chunk
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_r = tl.arange(0, R)  # [R]
    n_ok = offs_n < N
    rows_total = K // VALS
    m0 = pid_m * BLOCK_M
    zero_n = offs_n * 0
    ok1 = n_ok & (zero_n + m0 + 1 < M)  # [BN] store masks of the rows after the first
    ok2 = n_ok & (zero_n + m0 + 2 < M)
    ok3 = n_ok & (zero_n + m0 + 3 < M)
    acc0 = tl.zeros((R, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((R, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((R, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((R, BLOCK_N), dtype=tl.float32)

    c_start = pid_k * chunks_per_split
    c_end = tl.minimum(c_start + chunks_per_split, tl.cdiv(K, BLOCK_K))
    for c in range(c_start, c_end):
        offs_w = c * R + offs_r  # packed rows [R]
        # Out-of-range rows read code 0 and x = 0: they add 0 * (0 - z) = 0.
        words = tl.load(qw_ptr + offs_w[:, None] * N + offs_n[None, :], mask=(offs_w[:, None] < rows_total) & n_ok[None, :], other=0)
        g = (c * BLOCK_K) // GROUP_SIZE  # the chunk's one group
        s = tl.load(scales_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)  # [BN]
        z = tl.load(zeros_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)  # [BN]
        if BLOCK_M == 1:  # d: x . (q - z) of this chunk, scaled once at its end
            d0 = tl.zeros((R, BLOCK_N), dtype=tl.float32)
        for h in tl.static_range(2):
            if h == 0:
                wh = words
            else:
                wh = words >> 16  # the high half word; bits above 16 are masked off below
            for jj in tl.static_range(HALF):
                j = h * HALF + jj
                kk = (c * BLOCK_K + offs_r * VALS + j)[:, None]  # [R, 1]
                k_ok = kk < K
                bits = (wh & (MASK << (jj * BITS))) | MAGIC_BITS  # 2^23 + q * 2^(jj*BITS)
                zc = MAGIC + z * (1 << (jj * BITS))  # [BN], 2^23 + z * 2^(jj*BITS): exact
                w = bits.to(tl.float32, bitcast=True) - zc[None, :]  # (q - z) * 2^(jj*BITS), exact
                if BLOCK_M == 1:
                    d0 += _xrow(x_ptr, m0 * stride_xm, kk, k_ok, jj * BITS) * w
                else:  # several rows share the scaled weight
                    w = w * s[None, :]
                    acc0 += _xrow(x_ptr, m0 * stride_xm, kk, k_ok, jj * BITS) * w
                    # rows past M read row M - 1 (valid memory); their sums are never stored
                    acc1 += _xrow(x_ptr, tl.minimum(m0 + 1, M - 1) * stride_xm, kk, k_ok, jj * BITS) * w
                    if BLOCK_M > 2:
                        acc2 += _xrow(x_ptr, tl.minimum(m0 + 2, M - 1) * stride_xm, kk, k_ok, jj * BITS) * w
                        acc3 += _xrow(x_ptr, tl.minimum(m0 + 3, M - 1) * stride_xm, kk, k_ok, jj * BITS) * w
        if BLOCK_M == 1:
            acc0 += d0 * s[None, :]

    b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_BIAS:  # added once, by the first K split
        b = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        b = tl.where(pid_k == 0, b, 0.0)
    # rows of this program's tile go to out (one split), or to the fp32 buffer / workspace (K split)
    dst_ptr = ws_ptr if REDUCE == 2 else out_ptr
    stride_d = N if REDUCE == 2 else stride_om
    _put(dst_ptr + m0 * stride_d + offs_n, tl.sum(acc0, axis=0) + b, n_ok, REDUCE)
    if BLOCK_M > 1:
        _put(dst_ptr + (m0 + 1) * stride_d + offs_n, tl.sum(acc1, axis=0) + b, ok1, REDUCE)
    if BLOCK_M > 2:
        _put(dst_ptr + (m0 + 2) * stride_d + offs_n, tl.sum(acc2, axis=0) + b, ok2, REDUCE)
        _put(dst_ptr + (m0 + 3) * stride_d + offs_n, tl.sum(acc3, axis=0) + b, ok3, REDUCE)
    if REDUCE == 2:  # splitk.IN_KERNEL: the tile's last program writes all its rows to out
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m < M)[:, None] & n_ok[None, :]
        finish_tile(ws_ptr + offs_m[:, None] * N + offs_n[None, :], out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                    mask, counter_ptr + pid_m * tl.num_programs(0) + pid_n, n_splits)


@triton.jit
def _put(ptrs, v, mask, REDUCE: tl.constexpr):
    if REDUCE == 0:  # splitk.STORE
        tl.store(ptrs, v.to(ptrs.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, v, mask=mask, sem="relaxed")


def gemv_block_k(bits: int, group_size: int, k: int, block_k: int = 128) -> int | None:
    """The chunk depth the GEMV can use for this layer (each chunk inside one group), or None."""
    vals = 32 // bits
    if group_size >= k:
        return block_k  # per-channel: one group
    bk = min(block_k, group_size)
    if bk & (bk - 1) or bk < vals or group_size % bk:
        return None  # group size not a power of two (or smaller than a word): the dot path handles it
    return bk


def launch(x, p, bias, target, ws, counters, cfg, per_split: int, split: int, reduce: int, grid) -> None:
    """Launch `_gemv_kernel` on grid (N tiles, split, M tiles); the caller holds the device guard and built
    `target` (out, or the fp32 buffer) and the workspace / counters for splitk.IN_KERNEL."""
    m = x.shape[0]
    n, k = p.shape
    _gemv_kernel[grid](
        x, p.qweight, p.scales, p.zeros, bias if bias is not None else x, target, ws, counters,
        m, n, k, per_split, split,
        x.stride(0), target.stride(0),
        BITS=p.bits, GROUP_SIZE=p.group_size, HAS_BIAS=bias is not None, REDUCE=reduce,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
