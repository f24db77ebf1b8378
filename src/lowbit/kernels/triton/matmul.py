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

import functools
import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..repack import Packed
from . import device_guard, interpreting
from . import gemv as _gemv
from . import splitk, swapab
from .splitk import finish_tile
from .dequant import _unpack_tile
from .dequant_gemm import DequantGemm, dequant_gemm
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
        offs_w = c * R + tl.arange(0, R)  # packed rows [R]
        # Out-of-range k read x = 0 and codes = 0, so they add nothing on any path.
        words = tl.load(qw_ptr + offs_w[:, None] * N + offs_n[None, :], mask=(offs_w[:, None] < K // VALS) & n_ok[None, :], other=0)
        if GROUP_PER_CHUNK:
            g = (c * BLOCK_K) // GROUP_SIZE  # the one group of this chunk
            s = tl.load(scales_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)  # [BN]
            z = tl.load(zeros_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)  # [BN]
        else:
            s = tl.zeros((BLOCK_N,), dtype=tl.float32)  # unused: _mac loads per-k rows
            z = s
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


@dataclass(frozen=True)
class Config:
    """Launch parameters of `_qmm_kernel`; split_k is the number of programs sharing one tile's K loop."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    scale_after_dot: bool = True
    group_m: int = 8
    split_unpack: bool = False  # VALS dots of K = block_k*bits/32 instead of one reshaped [BK, BN] tile
    gemv: bool = False  # gemv.py: no tl.dot, fp32 FMA after a magic-number dequantize (small M)
    magic: bool = False  # dot paths: codes -> fp16/bf16 by the magic-number trick instead of int->float converts
    unpack4: bool = False  # 4 bits: unpack4.py's two-codes-per-instruction unpack (inline PTX); with split_unpack
    # one dot per code position (small M), else the positions interleaved back into k order for one deep dot
    x_once: bool = False  # unpack4 with split_unpack: x loaded once per chunk, split in registers (else per position)
    # K splits meet inside the launch (splitk.py) rather than in a zeroed buffer cast afterwards (+2 launches).
    # Its ticket's release fence waits for the program's atomic adds to land, which costs where few large
    # programs share an SM (the 64x128, 8-warp tile: 0.96 vs 1.16x fp16 at M = 32, H100 r11); pick_config
    # sets it by M.
    in_kernel_reduce: bool = True
    # > 0: stream-K, a 1-D grid of stream_k programs per SM, each an equal run of the tiles x chunks steps
    # (crossing tile boundaries; split_k is then unused), so no SM idles on a partial last wave
    stream_k: int = 0
    # swapab.py: the unpacked weight as the wgmma's register operand, block_m tokens x block_n weight columns
    # (4 bits, a group per 128-deep chunk; block_k is 128); x_permuted: x reordered in torch, not in the kernel
    swap_ab: bool = False
    x_permuted: bool = False
    # > 0: ptxas register cap per thread (Triton's maxnreg), swapab.py only: two 8-warp programs per SM need
    # <= 128 (65536 registers / 512 threads)
    max_registers: int = 0


# M from which dequantize + cuBLAS replaces the fused kernel (bench/kernel_speed.py --sweep, H100, 2026-11-25:
# the fused GEMM lost to it at M >= 1024 on every Llama shape).
DEQUANT_MIN_M = 1024
DEQUANT_SLAB_N = 2048  # columns per dequantized slab at large M (dequant_gemm.py)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


# Largest M given to the FMA GEMV (gemv.py). Measured on an H100 (bench/kernel_speed.py --quick, 2026-11-25 r2):
# at M = 1 it gives 2.28-2.34x fp16 on 8192x28672 / 28672x8192 against 1.83-1.86x for the split-unpack dot
# with the magic-number conversion; at M = 4 (4 rows per program) only 1.08-1.17x against 1.75-1.83x, since
# its cost per weight code grows by one FFMA per row while the tensor-core dot's does not.
GEMV_MAX_M = 1


def gemv_config(m: int, n: int, k: int, sm_count: int = 132, block_n: int | None = None, num_warps: int | None = None,
                block_k: int | None = None) -> Config:
    """GEMV launch for m <= GEMV_MAX_M: one row block holding all of M (the weight is read once); block_n =
    128 * num_warps gives each thread 4 columns (16-byte loads) and every packed row of the chunk (the sum
    over k stays in the thread); a K split large enough for ~8 programs per SM while each keeps >= 2 chunks
    (the measured best, "gemv_split_x2" in the r2 table: 2.28 / 2.34 / 1.60x fp16 on 8192x28672 /
    28672x8192 / 4096x4096 against 2.21 / 2.30 / 1.28x with half the split).
    Register use from the SASS (Triton 3.9, sm_90): 1 row 512x64/4 warps 164 regs; 2 rows 512x64/8 warps
    128; 4 rows 512x32/8 warps 128, no spills."""
    block_m = max(1, 1 << (m - 1).bit_length())
    if block_m > 4:
        raise ValueError(f"the GEMV takes at most 4 rows per program, not {block_m}")
    if num_warps is None:
        num_warps = 4 if block_m == 1 else 8
    if block_n is None:
        block_n = 512
    if block_k is None:
        block_k = 32 if block_m == 4 else 64
    tiles = triton.cdiv(n, block_n)
    chunks = triton.cdiv(k, block_k)
    split = 1
    while tiles * split < 8 * sm_count and chunks // (split * 2) >= 1 and split < 64:
        split *= 2
    return Config(block_m, block_n, block_k, split_k=split, num_warps=num_warps, num_stages=1, gemv=True)


def dot_split(m: int, n: int, chunks: int, sm_count: int) -> int:
    """K split of the 16x128 split-unpack dot for M <= 16: the smallest power of two giving >= 3 programs
    per SM, at least 4 where the K loop has >= 16 chunks, at most one split per chunk and 64.

    bench/decode_tune.py, H100, 2026-11-26, M = 8, chained decode layers (best split in brackets): 4096x4096
    14.1 µs (16) against 16.4 with the earlier fixed split of 8 (>= 4 chunks each); 4096x1024 7.5 µs (32)
    against 12.6; 14336x4096 29.2 µs (16) against 38.8; 4096x14336 31.9 (4) / 31.2 (8) against 33.2."""
    tiles = triton.cdiv(m, 16) * triton.cdiv(n, 128)
    split = 1
    while tiles * split < 3 * sm_count and split * 2 <= min(chunks, 64):
        split *= 2
    if chunks >= 16:
        split = max(split, 4)
    return split


# At M = 1 the unpack4 dot (x loaded once per chunk) beats the GEMV on deep layers only (H100, 2026-11-26,
# bench/results/unpack4-2026-11-26/xonce/): 28672x8192 2.88 vs 2.69x fp16, 14336x4096 21.0 vs 24.2 µs chained,
# 8192x28672 2.35 vs 2.34x; the GEMV stays ahead at K = 4096 (4096x4096 9.8 vs 11.1 µs, 4096x14336 21.2 vs 21.7).
UNPACK4_MIN_K_AT_M1 = 8192


def unpack4_split(m: int, n: int, chunks: int, sm_count: int) -> int:
    """K split of the 16x256 unpack4 dot (M <= 16): the smallest power of two giving >= 1.5 programs per SM
    (at most one split per chunk and 64).

    bench/decode_tune.py --only-unpack4, H100, 2026-11-26 (chained decode layers, M = 4 / 8 / 16, best split
    of 1..64 at 16x256, 4 warps): 4096x4096 16 (256 programs), 4096x1024 32 (128, one chunk each), 4096x14336
    4 (224), 14336x4096 16 (256); splits giving 3 programs per SM were 10-20% slower on the last three.
    An earlier floor of 4 splits (deep K loops) is gone: with x loaded once, 8192x28672 (112 tiles) ran faster at
    the 1.5-per-SM rule's split 2 (H100 r16: 2.49 / 2.39 / 2.46 / 2.34x fp16 at M = 1 / 4 / 8 / 16 against
    2.43 / 2.32 / 2.35 / 2.27x at 4); the floor only ever bound where N has >= 99 tiles (N > 25000)."""
    tiles = triton.cdiv(m, 16) * triton.cdiv(n, 256)
    split = 1
    while tiles * split * 2 < 3 * sm_count and split * 2 <= min(chunks, 64):
        split *= 2
    return split


# Largest M whose small-M dot reduces its K splits inside the launch (splitk.py); see pick_config.
IN_KERNEL_REDUCE_MAX_M = 8
# At M <= 16, stream-K where the layer has at least this many column tiles per SM (see pick_config).
STREAM_K_MIN_TILES_PER_SM = 0.5


# swapab.py (the weight as the wgmma's register operand) from M = 17 to 1023 at 4 bits with a group per
# 128-deep chunk. H100 r22 (2026-11-26, bench/results/kernels-2026-11-26-r22.*), fp16 speedup on 8192x28672 /
# 28672x8192 / 4096x4096, swap_ab_config's tile against the pick of the time:
#   M = 32   1.85 / 1.96 / 1.00  vs 1.53 / 1.54 / 1.07 (x_once, stream-K)
#   M = 64   1.55 / 1.64 / 0.92  vs 1.13 / 1.23 / 0.91 (interleaved unpack4 dot)
#   M = 128  1.07 / 1.19 / 0.67  vs 0.84 / 0.48 / 0.63 (tiled GEMM)
#   M = 256  0.77 / 0.76 / 0.62  vs 0.49 / 0.48 / 0.70 (tiled GEMM)
#   M = 16   1.97 / 2.04 / 1.13  vs 2.40 / 2.50 / 1.37 (unpack4 x_once: stays)
# r26/r27 (wgmmas no longer serialised by ptxas, see swapab.py): M = 128 1.12-1.15 / 1.21-1.22 / 0.68,
# M = 256 0.85 / 0.79 / 0.57, M = 512 0.69 / 0.68 / 0.51 against 0.43 / 0.44 / 0.72 (tiled GEMM),
# M = 1024 0.76 / 0.67 / 0.65 against dequantize + cuBLAS' 0.79 / 0.76 / 0.75 (stays).
# r31, 257-1023 on the mid-sized Llama layers (swap AB vs dequantize + cuBLAS): M = 512 0.58 vs 0.61
# (8192x8192), 0.59 vs 0.63 (14336x4096), 0.76 vs 0.65 (4096x14336); M = 768 0.58 vs 0.70, 0.56 vs 0.70,
# 0.67 vs 0.66; M = 256 0.70 / 0.78 / 0.63 vs 0.52 / 0.57 / 0.54. Above 256 tokens swap AB wins only where the
# weight columns alone nearly fill the GPU (no K split; 28672x8192, 64 column tiles: 0.57 vs 0.55 at 384,
# 0.69 vs 0.69 at 768, r29).
# So: 33-128 everywhere; 17-32 and 129-256 on large layers (>= SWAP_AB_MIN_WEIGHTS codes; 4096x4096 has
# 16.8M); 257-1023 on large layers with >= SWAP_AB_MIN_COLUMN_TILES_PER_SM 128-column tiles per SM.
SWAP_AB_MIN_M = 17
SWAP_AB_MAX_M = DEQUANT_MIN_M - 1
SWAP_AB_MIN_WEIGHTS = 1 << 25
SWAP_AB_MIN_COLUMN_TILES_PER_SM = 0.75


def swap_ab_config(m: int, n: int, k: int, sm_count: int = 132) -> Config:
    """swapab.py launch: token tile = M rounded up to a power of two (16..128; 256 above 128), 128 weight
    columns, 8 warps (two warpgroups, one m64 wgmma row block each: 4 warps doing both lost 13-34% in r22),
    x reordered in torch, and the smallest power-of-two K split giving one program per SM (twice that lost
    3-21% in r22/r23), at most half the chunks; splits meet in a zeroed buffer (in the launch: within 2% at
    M <= 64 on 28672x8192, up to 20% slower at M >= 128). Token tiles of <= 64 are capped at 128 registers so
    two programs share an SM (r27, 64 tokens: 1.54 / 1.64x fp16 on 8192x28672 / 28672x8192 against 1.43 / 1.64x
    with the 162 registers ptxas takes for the pipelined wgmmas; smaller tiles need fewer anyway)."""
    bm = 256 if m > 128 else max(16, 1 << (m - 1).bit_length())
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, 128)
    chunks = triton.cdiv(k, swapab.CHUNK)
    split = 1
    while tiles * split < sm_count and split * 2 <= chunks // 2:
        split *= 2
    return Config(bm, 128, swapab.CHUNK, split_k=split, num_warps=8, num_stages=3, swap_ab=True, x_permuted=True, in_kernel_reduce=False,
                  max_registers=128 if bm <= 64 else 0)


def pick_config(m: int, n: int, k: int, bits: int, group_size: int, sm_count: int = 132) -> Config | DequantGemm | None:
    """Kernel choice by M (see `_pick_kernel`); K splits are reduced inside the launch (splitk.py) at
    M <= IN_KERNEL_REDUCE_MAX_M only. H100 r11-r13, pick_config's tiles, in launch / zero-fill + cast, fp16
    speedup on 8192x28672 / 28672x8192 / 4096x4096: M = 1 2.43 / 3.09 / 1.70 against 2.36 / 2.97 / 1.58,
    M = 8 2.36 / 2.98 / 1.36 against 2.33 / 2.92 / 1.29, M = 16 2.26 / 2.88 / 1.33 against 2.29 / 2.88 / 1.40,
    M = 64 0.88 / 0.98 / 0.80 against 1.11 / 1.24 / 0.93."""
    cfg = _pick_kernel(m, n, k, bits, group_size, sm_count)
    if isinstance(cfg, Config) and cfg.x_once and m <= 32 and (m > 16 or STREAM_K_MIN_TILES_PER_SM * sm_count <= triton.cdiv(n, cfg.block_n)):
        # stream-K, 2 programs per SM (H100 r21, against the K-split pick in the same run): M = 32 1.53 / 1.55 /
        # 1.08x fp16 vs 1.44 / 1.50 / 1.09x on 8192x28672 / 28672x8192 / 4096x4096; at M <= 16 it won only with many
        # column tiles (8192x28672, 112 tiles: 2.58 / 2.40x vs 2.50 / 2.34x at M = 1 / 16) and lost 2-6% with few
        # (28672x8192, 32 tiles: 3.00 / 2.45 vs 3.07 / 2.51; 4096x4096, 16: 1.33 vs 1.41 at M = 16)
        return dataclasses.replace(cfg, stream_k=2, in_kernel_reduce=True)
    if isinstance(cfg, Config):
        cfg = dataclasses.replace(cfg, in_kernel_reduce=m <= IN_KERNEL_REDUCE_MAX_M)
    return cfg


def _pick_kernel(m: int, n: int, k: int, bits: int, group_size: int, sm_count: int) -> Config | DequantGemm | None:
    """Kernel choice by M; a DequantGemm or None means dequantize + cuBLAS (in slabs / whole).

    From bench/kernel_speed.py on an H100 (W4 g128; the r1 sweep and the r2 --quick run of 2026-11-25, see
    docs/kernels.md); at M = 1, 4, 16, 64 and 1024 each choice below is a config timed in r2:
    M <= 16 at 4 bits with a group per 128-deep chunk (M = 1 only where K >= UNPACK4_MIN_K_AT_M1): the unpack4
    dot (unpack4.py) with x loaded once per chunk, 16x256 tiles, K split by `unpack4_split` (H100 xonce run:
    2.26-2.44x fp16 at M = 16 and 2.32-2.48x at M = 4 on the large shapes). Other M = 1: the FMA GEMV
    (gemv.py), 2.3-2.7x fp16 on the large shapes. Other 2 <= M <= 16: split unpack with the
    magic-number conversion, 16x128 tiles, K split by `dot_split` (1.75-1.83x at M = 4, 1.27-1.47x at M = 16
    with the earlier 8-way split on the large shapes, where dot_split gives 4-8).
    16 < M <= 64 at 4 bits with a group per 128-deep chunk: unpack4 interleaved back into k order, one deep
    dot per chunk, 64x128, 8 warps, K split 4 (r6: 1.14-1.27x at M = 64, 1.16-1.21x at M = 32 on the large
    shapes); since r12 17 <= M <= 32 takes the split unpack4 form with x loaded once, 32x128, K split 8
    (1.43 / 1.50 / 1.09x). Otherwise 16 < M <= 32: reshape unpack, 32x128, K split 4, magic; 32 < M <= 64: reshape unpack,
    64x128, K split 4, 8 warps, magic (1.09-1.15x). Since r22 swap AB (swapab.py) at 17 <= M <= 1023 where
    4-bit chunks hold one group (on every layer at 33-128, on large ones elsewhere). Larger M, and M > 64
    otherwise: dequantize + cuBLAS (0.73x at M = 1024; in 2048-column slabs where N >= 8192: 0.74-0.79x,
    r15/r18).
    """
    if m >= DEQUANT_MIN_M:
        # dequantize + cuBLAS; on wide layers in 2048-column slabs, the next dequantized on a side stream
        # (H100 r15: 0.77 / 0.73x fp16 at M = 1024 on 8192x28672 / 28672x8192 against 0.74 / 0.72x whole,
        # 0.97 / 1.00x at M = 4096 against 0.95 / 1.00x), and the fp16 temporary is 2 slabs, not the whole W
        return DequantGemm(DEQUANT_SLAB_N, overlap=True) if n >= 4 * DEQUANT_SLAB_N else None
    chunks = lambda bk: triton.cdiv(k, bk)  # noqa: E731
    unpack4_ok = bits == 4 and (group_size >= k or group_size % 128 == 0)  # a group per 128-deep chunk
    if m <= 16 and unpack4_ok and (m > GEMV_MAX_M or k >= UNPACK4_MIN_K_AT_M1):
        return Config(16, 256, 128, split_k=unpack4_split(m, n, triton.cdiv(k, 128), sm_count), num_warps=4, num_stages=3,
                      split_unpack=True, unpack4=True, x_once=True)
    if m <= GEMV_MAX_M:
        return gemv_config(m, n, k, sm_count)
    if m <= 16:
        block_k = 512 // bits  # block_k * bits / 32 = 16 packed rows: tl.dot's smallest depth
        return Config(16, 128, block_k, split_k=dot_split(m, n, triton.cdiv(k, block_k), sm_count), num_warps=4, num_stages=3,
                      split_unpack=True, magic=True)
    large = n * k >= SWAP_AB_MIN_WEIGHTS and (m <= 256 or triton.cdiv(n, 128) >= SWAP_AB_MIN_COLUMN_TILES_PER_SM * sm_count)
    if SWAP_AB_MIN_M <= m <= SWAP_AB_MAX_M and unpack4_ok and k % swapab.CHUNK == 0 and (large or 32 < m <= 128):
        return swap_ab_config(m, n, k, sm_count)
    if m <= 32 and unpack4_ok:
        # the split unpack4 form with x loaded once, 32-row tiles (H100 r11, 2026-11-26: 1.36 / 1.49 / 1.05x fp16 at
        # M = 32 on 8192x28672 / 28672x8192 / 4096x4096 against 1.16 / 1.23 / 0.95x for the interleaved 64x128 dot)
        split = 8
        while split > 1 and chunks(128) // split < 2:
            split //= 2
        # (r12: 1.43 / 1.50 / 1.09x with the zero-fill + cast, as pick_config runs it, 1.36 / 1.50 / 1.09x without)
        return Config(32, 128, 128, split_k=split, num_warps=4, num_stages=3, split_unpack=True, unpack4=True, x_once=True)
    if m <= 64 and unpack4_ok:
        # unpack4 interleaved into one deep dot, 64x128, 8 warps (H100 r6, 2026-11-26: 1.14 / 1.27 / 0.91x fp16 at
        # M = 64 on 8192x28672 / 28672x8192 / 4096x4096 against 1.10 / 1.15 / 0.86x for the reshape magic dot;
        # M = 32 1.16 / 1.21 / 0.96x against 1.09 / 1.13 / 0.79x for its 32x128 tile)
        split = 4
        while split > 1 and chunks(128) // split < 4:
            split //= 2
        return Config(64, 128, 128, split_k=split, num_warps=8, num_stages=3, unpack4=True)
    if 32 < m <= 64:  # measured (r2): 1.09-1.15x fp16 on the large shapes, against 0.94-1.01x for 64x64, K split 2
        block_k = 64 if group_size % 128 and group_size < k and group_size % 64 == 0 else 128  # one group per chunk
        split = 4
        while split > 1 and chunks(block_k) // split < 4:
            split //= 2
        return Config(64, 128, block_k, split_k=split, num_warps=8, num_stages=3, magic=True)
    if m <= 64:
        block_m = 32 if m <= 32 else 64
        block_n = 128 if m <= 32 else 64
        block_k = 128
        if group_size % block_k and group_size < k and group_size % 64 == 0:
            block_k = 64  # keep one group per chunk for the scale-after-dot path
        split = 4 if m <= 32 else 2
        while split > 1 and chunks(block_k) // split < 4:
            split //= 2
        return Config(block_m, block_n, block_k, split_k=split, num_warps=4, num_stages=4, magic=True)
    # M > 64 without swap AB: dequantize + cuBLAS, the whole weight at once. The tiled GEMM with a per-tile
    # dequantize (Config(128, 128, 64, scale_after_dot=False)) lost everywhere it was timed (r29, fp16 speedup
    # at M = 384 / 768: 0.42 / 0.44, 0.37 / 0.34, 0.35 / 0.37 on 8192x28672 / 28672x8192 / 4096x4096 against
    # 0.51 / 0.69, 0.55 / 0.69, 0.74 / 0.71), and so did the 2048-column slabs of M >= 1024 (r32, M = 384 /
    # 768: 0.46 / 0.63 on 28672x8192, 0.45 / 0.58 on 8192x8192 against 0.56 / 0.68 and 0.57 / 0.69 whole:
    # cuBLAS runs M x 2048 slabs below its best rate)
    return None


def quant_matmul(
    x: torch.Tensor, p: Packed, bias: torch.Tensor | None = None, config: Config | DequantGemm | None | str = "auto", out: torch.Tensor | None = None,
    in_kernel_reduce: bool | None = None,
) -> torch.Tensor:
    """out [M, N] = x [M, K] @ dequant(p) (+ bias), in x's dtype (fp16 or bf16).

    config: "auto" (pick_config), a Config, or None / a DequantGemm (dequantize + cuBLAS, whole or in slabs).
    out: optional [M, N] tensor of x's dtype to write into (tests poison it first).
    in_kernel_reduce: K splits meet inside the launch (splitk.py); False forces the zero-fill + cast path
    that CUDA-graph capture falls back to (tests run both); None: the config's choice (unless a benchmark
    cleared splitk.IN_KERNEL_DEFAULT).
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
        config = pick_config(m, n, k, p.bits, p.group_size, _sm_count(x.device))
        if isinstance(config, DequantGemm) and config.slab_n and x.is_cuda and not torch.cuda.is_current_stream_capturing():
            # The slabs win inside a CUDA graph only: launched call by call (eager prefill), their ~4 launches
            # per slab cost more host time than the GPU spends on a slab (H100 r35, eager, M = 1024:
            # 0.25-0.54x fp16 on 8192x28672 and 0.22-0.29x on 4096x14336 against 0.74x for the whole weight)
            config = DequantGemm()
    if config is None or isinstance(config, DequantGemm):
        return dequant_gemm(x, p, bias, out, config or DequantGemm())

    cfg = config
    if cfg.swap_ab:
        if in_kernel_reduce is None:
            in_kernel_reduce = cfg.in_kernel_reduce and splitk.IN_KERNEL_DEFAULT
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
            in_kernel_reduce = cfg.in_kernel_reduce and splitk.IN_KERNEL_DEFAULT
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
            )
    return out.copy_(target) if reduce == splitk.ATOMIC_BUFFER else out
