"""Grouped mixture-of-experts matmul: one projection of every expert in ONE launch, weights dequantized on the fly.

A MoE layer sends token t to top_k experts: S = T * top_k (token, expert) pairs, pair p = t * top_k + slot.
Run expert by expert, a layer costs ~3 launches per expert hit (384 at a 128-expert prefill) and a host sync to
find the hit experts. Here a layer is two launches of the matmul plus one of `align`:

1. `align` (one program): the pairs sorted by expert into `sorted_ids` [B * BLOCK_M]. Expert e's pairs fill
   ceil(n_e / BLOCK_M) consecutive blocks of BLOCK_M slots; the rest of its last block holds the sentinel S
   (no pair), so every block of rows belongs to one expert, named by `block_expert` [B]. Ids outside [0, E)
   (expert-parallel sentinels, which the per-expert loop skips) go to one more bin, E, whose blocks write zero
   rows. B is the worst case for S pairs (each non-empty bin's last block holding one pair), so no size depends
   on the routing: no host sync, CUDA-graph safe; blocks past the used ones get E + 1 and exit at once.
   Counts are a histogram, block starts an exclusive cumsum of the padded counts, and each pair takes its slot
   with an atomic add on its bin's cursor: the order of the pairs inside an expert's blocks varies between
   runs, but a row's result does not depend on its place in the tile, so the output is deterministic.
2. `grouped_matmul`: program (block b, column tile n) computes rows sorted_ids[b*BM : (b+1)*BM] times columns
   [n*BN, (n+1)*BN) of expert block_expert[b]'s weight (a `repack.Stacked`: [E, P parts, K*bits/32, NP]),
   gathering input rows (pair p reads row p // TOP_K: x holds tokens for the first projection, TOP_K = top_k,
   and pairs for the second, TOP_K = 1), unpacking and dequantizing the expert's [BK, BN] weight tile in
   registers as matmul.py does, adding the bias, multiplying by the router weight of p if given, and storing
   row p. BN divides NP, so a column tile lies in one part (gate or up) and its words are contiguous; part p's
   columns land at p*NP + c, or at c*P + p for interleaved layouts (gpt-oss), which is how the model's
   `_apply_gate` expects the fused gate/up output.
3. Decode sizes (K split): at 1 token the 8 hit experts give 8 blocks, a few hundred (block, column tile)
   programs each walking all of K: most SMs idle, the weights read far below the bandwidth. `pick` then splits
   K's chunks over SPLIT_K programs per tile (grid axis 1), by the rule of the device's kernel table
   ("moe_split", table.py's `k_split`, the SM count an input; the dense kernels' mechanism), and the partials
   meet as in splitk.py: fp32 atomic adds into its persistent workspace ([S, P*NP], rows by pair) with the tile's
   last program casting into out (one launch), or, while a CUDA graph is captured and the workspace would have
   to grow, into a zeroed fp32 buffer cast afterwards. The bias rides on split 0's partial; the router weight
   scales every partial (linear, so the sum is scaled once). Sentinel rows are stored by split 0, and blocks
   past the used ones exit on every split before touching a counter, so each tile's ticket counts exactly
   its splits. The split depends on shapes only (the pairs a uniform routing fills), never on the routing.

Inner loops (fp32 accumulation everywhere):
* UNPACK4 (4 bits, a group per 128-deep chunk, BLOCK_M <= 32): unpack4.py turns each pair of word rows into the
  8 code positions' (q - z) operands, one dot of depth BK / 8 per position with the stride-8 columns of x, the
  scale applied once per chunk (the small-M path of matmul.py).
* otherwise matmul.py's `_mac`: the word tile expanded to [BK, BN] codes; with a group per chunk the zero is
  folded into 16-bit operands by the magic-number trick (MAGIC) or applied after the dot, else each weight is
  dequantized in fp32 with its own group's scale and zero (groups smaller than the chunk).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..repack import Stacked
from . import device_guard, interpreting, smem, splitk
from . import table as _table
from .dequant import _unpack_tile
from .matmul import _device_name, _dot, _mac, _sm_count, load_chunk
from .splitk import finish_tile
from .unpack4 import unpack4_dot_operands

# ---------------------------------------------------------------- align: pairs sorted by expert, padded to blocks


@triton.jit
def _align_kernel(
    # pointers: expert id per pair [S] (any int dtype); out: sorted_ids int32 [n_blocks * BLOCK_M], block_expert
    # int32 [n_blocks]; cursor: int32 scratch [E_PAD] (each bin's next free slot)
    ids_ptr, sorted_ptr, block_expert_ptr, cursor_ptr,
    # sizes
    S, E, n_blocks,
    # meta-parameters: E_PAD a power of two >= E + 2 (bins 0..E-1 experts, E sentinels, E + 1 masked lanes)
    BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr, BCHUNK: tl.constexpr,
):
    bins = tl.arange(0, E_PAD)
    counts = tl.zeros((E_PAD,), dtype=tl.int32)
    for s0 in range(0, S, CHUNK):
        offs = s0 + tl.arange(0, CHUNK)
        ok = offs < S
        e = tl.load(ids_ptr + offs, mask=ok, other=0)
        e = tl.where(ok, tl.where((e >= 0) & (e < E), e, E), E + 1).to(tl.int32)
        counts += tl.histogram(e, E_PAD)
    padded = tl.where(bins <= E, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)  # [E_PAD] slots per bin
    ends = tl.cumsum(padded, 0)
    tl.store(cursor_ptr + bins, ends - padded)
    # block b belongs to the bin whose slot range holds b * BLOCK_M: the number of bins ending at or before it
    # (empty bins end where they start, so they are counted exactly when they lie before); E + 1 past the end
    for b0 in range(0, n_blocks, BCHUNK):
        b = b0 + tl.arange(0, BCHUNK)
        before = (ends[None, :] <= (b * BLOCK_M)[:, None]) & (bins[None, :] <= E)  # [BCHUNK, E_PAD]
        tl.store(block_expert_ptr + b, tl.sum(before.to(tl.int32), axis=1), mask=b < n_blocks)
    none = tl.zeros((CHUNK,), dtype=tl.int32) + S
    for p0 in range(0, n_blocks * BLOCK_M, CHUNK):
        offs = p0 + tl.arange(0, CHUNK)
        tl.store(sorted_ptr + offs, none, mask=offs < n_blocks * BLOCK_M)
    tl.debug_barrier()  # the cursors and the padding are written before any pair takes its slot
    for s0 in range(0, S, CHUNK):
        offs = s0 + tl.arange(0, CHUNK)
        ok = offs < S
        e = tl.load(ids_ptr + offs, mask=ok, other=0)
        e = tl.where((e >= 0) & (e < E), e, E).to(tl.int32)
        slot = tl.atomic_add(cursor_ptr + e, tl.full((CHUNK,), 1, tl.int32), mask=ok, sem="relaxed")
        tl.store(sorted_ptr + slot, offs, mask=ok)


def max_blocks(pairs: int, experts: int, block_m: int) -> int:
    """Blocks `align` may fill for `pairs` pairs: sum over non-empty bins of ceil(n / BM) <= (S + bins * (BM - 1)) / BM,
    with at most min(S, E + 1) non-empty bins."""
    return (pairs + min(pairs, experts + 1) * (block_m - 1)) // block_m


def align(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """top_k_index [T, k] (or [S]) -> (sorted_ids int32 [B * block_m], block_expert int32 [B]), B = max_blocks."""
    ids = top_k_index.reshape(-1).contiguous()
    s = ids.numel()
    n_blocks = max_blocks(s, num_experts, block_m)
    sorted_ids = torch.empty(n_blocks * block_m, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(n_blocks, dtype=torch.int32, device=ids.device)
    if s == 0:
        return sorted_ids, block_expert
    e_pad = triton.next_power_of_2(num_experts + 2)
    cursor = torch.empty(e_pad, dtype=torch.int32, device=ids.device)
    with device_guard(ids):
        _align_kernel[(1,)](ids, sorted_ids, block_expert, cursor, s, num_experts, n_blocks,
                            BLOCK_M=block_m, E_PAD=e_pad, CHUNK=256, BCHUNK=max(1, min(64, 8192 // e_pad)), num_warps=4)
    return sorted_ids, block_expert


# ---------------------------------------------------------------- the grouped matmul


@triton.jit
def _moe_kernel(
    # pointers: x [rows, K]; the Stacked projection: qweight [E, P, K*BITS/32, NP], scales / zeros [E, P, G, NP],
    # bias [E, P, NP]; router weights [S]; out [S, P*NP] (the zeroed fp32 buffer with REDUCE == ATOMIC_BUFFER);
    # align's sorted_ids [n_blocks*BM] and block_expert; fp32 split-K workspace [S, P*NP] and per-tile counters
    # (splitk.py; used with REDUCE == IN_KERNEL only)
    x_ptr, qw_ptr, scales_ptr, zeros_ptr, bias_ptr, weight_ptr, out_ptr, sorted_ptr, block_expert_ptr, ws_ptr, counter_ptr,
    # sizes; K's chunks split in runs of chunks_per_split over n_splits programs (axis 1)
    S, E, K, NP, G, n_blocks, chunks_per_split, n_splits,
    # strides of the row dimension (last dimensions are contiguous)
    stride_xm, stride_om,
    # meta-parameters
    TOP_K: tl.constexpr, PARTS: tl.constexpr, INTERLEAVE: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, GROUP_PER_CHUNK: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr,
    MAGIC: tl.constexpr, UNPACK4: tl.constexpr, ASM: tl.constexpr, DOT_F32: tl.constexpr, REDUCE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    VALS: tl.constexpr = 32 // BITS  # codes per int32 word
    R: tl.constexpr = BLOCK_K // VALS  # packed rows per chunk
    # block-fastest order: the blocks of one expert (consecutive) read the same weight tile while it is in L2
    pid = tl.program_id(0)  # the output tile (block, column tile); also its split-K counter
    pid_k = tl.program_id(1)  # which run of K's chunks
    pid_b = pid % n_blocks
    pid_n = pid // n_blocks
    expert = tl.load(block_expert_ptr + pid_b)
    if expert > E:  # past the blocks this routing uses
        return
    pair = tl.load(sorted_ptr + pid_b * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM] pair ids, S = padding
    row_ok = pair < S
    n0 = pid_n * BLOCK_N
    part = n0 // NP  # BLOCK_N divides NP: the tile lies in one part
    offs_c = (n0 - part * NP) + tl.arange(0, BLOCK_N)  # [BN] columns of the part
    n_ok = offs_c < NP
    if INTERLEAVE:  # fused output [g0, u0, g1, u1, ...]
        offs_o = offs_c * PARTS + part
    else:  # [gate; up]
        offs_o = part * NP + offs_c
    out_ptrs = out_ptr + pair[:, None].to(tl.int64) * stride_om + offs_o[None, :]
    omask = row_ok[:, None] & n_ok[None, :]
    if expert == E:  # sentinel pairs: no expert here, a zero row (the loop adds nothing for them), stored by split 0
        if pid_k == 0:
            tl.store(out_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty), mask=omask)
        return

    which = expert.to(tl.int64) * PARTS + part  # this tile's [e, p] slice of the stacked buffers
    qw_base = qw_ptr + which * (K // VALS) * NP
    s_base = scales_ptr + which * G * NP
    z_base = zeros_ptr + which * G * NP
    x_rows = x_ptr + (pair // TOP_K).to(tl.int64)[:, None] * stride_xm  # [BM, 1] (masked where pair == S)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    c_start = pid_k * chunks_per_split
    for c in range(c_start, tl.minimum(c_start + chunks_per_split, tl.cdiv(K, BLOCK_K))):
        # words [R, BN] (k past K reads x = 0 and codes = 0), the chunk's scale and zero [BN] if it lies in one group
        words, s, z = load_chunk(qw_base, s_base, z_base, c, offs_c, n_ok, NP, K, BITS, GROUP_SIZE, GROUP_PER_CHUNK, BLOCK_N, BLOCK_K)
        d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # x . (q - z) or x . q of this chunk
        xs = tl.zeros((BLOCK_M,), dtype=tl.float32)  # sum_k x of this chunk (SCALE_AFTER_DOT without MAGIC)
        if UNPACK4:
            qs = unpack4_dot_operands(words, z, x_ptr.dtype.element_ty, ASM)  # 8 x [R, BN]: code j of word r is k = 8r + j
            offs_r = tl.arange(0, R)
            for j in tl.static_range(8):
                kk = c * BLOCK_K + offs_r * 8 + j  # [R]
                x = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < K), other=0.0)
                d = _dot(x, qs[j], d, DOT_F32)
            acc += d * s[None, :]
        else:
            kk = c * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
            x = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < K), other=0.0)
            q = _unpack_tile(words, BITS, BLOCK_K, BLOCK_N)  # int32 [BK, BN]
            acc, d, xs = _mac(acc, d, xs, x, q, kk, s, z, offs_c, n_ok, s_base, z_base, NP, K,
                              GROUP_SIZE, GROUP_PER_CHUNK, SCALE_AFTER_DOT, DOT_F32, MAGIC)
            if MAGIC:
                acc += d * s[None, :]
            elif SCALE_AFTER_DOT:
                acc += (d - xs[:, None] * z[None, :]) * s[None, :]
    if HAS_BIAS:  # added once, by the partial of the first split
        b = tl.load(bias_ptr + which * NP + offs_c, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, b, 0.0)[None, :]
    if HAS_WEIGHT:  # linear: each partial scaled by the router weight sums to the scaled total
        acc *= tl.load(weight_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    if REDUCE == 0:  # splitk.STORE
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask)
    elif REDUCE == 1:  # splitk.ATOMIC_BUFFER: out is a zeroed fp32 [S, P*NP] the splits add into
        tl.atomic_add(out_ptrs, acc, mask=omask, sem="relaxed")
    else:  # splitk.IN_KERNEL: the workspace has out's shape, contiguous; the tile's last split writes out
        ws_ptrs = ws_ptr + pair[:, None].to(tl.int64) * (PARTS * NP) + offs_o[None, :]
        tl.atomic_add(ws_ptrs, acc, mask=omask, sem="relaxed")
        finish_tile(ws_ptrs, out_ptrs, omask, counter_ptr + pid, n_splits)


@dataclass(frozen=True)
class MoeConfig:
    """Launch parameters of `_moe_kernel`; block_m must be the one `align` padded the experts' rows to."""

    block_m: int
    block_n: int
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    unpack4: bool = True  # 4 bits, a group per chunk, block_m <= 32: unpack4.py's operands, one dot per code position
    magic: bool = True  # a group per chunk otherwise: zero folded into 16-bit operands (matmul.py's MAGIC)
    split_k: int = 1  # programs sharing one tile's chunks (fewer if K has fewer chunks; no split is left empty)
    in_kernel_reduce: bool = True  # K splits meet inside the launch (splitk.py), else in a zeroed fp32 buffer + a cast


def block_m_for(pairs: int, experts: int) -> int:
    """Rows per block from the pairs an expert gets on average (uniform routing): decode-size batches give
    experts a few pairs each, so 16 (tl.dot's smallest M) wastes least; a prefill gives ~S / E each."""
    per_expert = pairs / experts
    return 16 if per_expert <= 24 else 32 if per_expert <= 48 else 64


def expected_blocks(pairs: int, experts: int, block_m: int) -> int:
    """Blocks a uniform routing fills: min(S, E) experts hit, each with S / min(S, E) pairs in ceil(. / BM) blocks."""
    hit = max(1, min(pairs, experts))
    return hit * -(-pairs // (hit * block_m))


# Column tiles: the widest of 128 / 64 / 32 that still gives PROGRAMS_PER_SM programs per SM for the blocks a
# routing is expected to fill, else 32 (16 for parts narrower than that). H200 sweep (bench/moe_kernel.py --sweep,
# 2026-11-30, Qwen3-30B-A3B experts, W4 g128, each projection alone): the best tile was 32 for gate/up at 1 token
# (8 blocks: 22.6 us against 26.3 for 64), 64 at 8 tokens (~60 blocks), 128 at 64 tokens (128 blocks: 128.4
# against 157.9 us for 64; down 76.0 against 83.4) and at 2048 tokens (~260 blocks of 64 rows, within 2%); down
# at 1 token: 32 and 64 within 2%. This rule picks each of those.
PROGRAMS_PER_SM = 8


def pick(block_m: int, parts: int, n_part: int, pairs: int, experts: int, sm_count: int = 132, k: int = 0,
         split_rule: dict | None = None, bits: int = 4, group_size: int = 128, max_shared: int = smem.DEFAULT_MAX_SHARED) -> MoeConfig:
    """The launch for one projection of P parts of NP columns and depth K over `pairs` pairs: 128-deep chunks,
    column tiles as above, and K split by `split_rule` (a kernel table's "moe_split", table.py: `k_split` on the
    tiles a uniform routing fills; None: the default table's) so that decode sizes, whose few blocks leave most
    SMs idle, still have enough programs in flight. k = 0: no split. Pipeline stages: 3 (2 at 64-row blocks), fewer
    where smem.py's estimate for `bits` / `group_size` would pass `max_shared` (the device's per-block limit)."""
    fits = [b for b in (128, 64, 32, 16) if n_part % b == 0]
    if not fits:
        raise ValueError(f"the grouped MoE kernel needs a part width divisible by 16, got {n_part}")
    blocks = expected_blocks(pairs, experts, block_m)
    block_n = next((b for b in fits if b >= 32 and blocks * parts * (n_part // b) >= PROGRAMS_PER_SM * sm_count), None)
    if block_n is None:
        block_n = 32 if 32 in fits else fits[-1]
    rule = split_rule if split_rule is not None else _table.default_table().moe_split
    split = _table.k_split(rule, blocks * parts * (n_part // block_n), triton.cdiv(k, 128), sm_count)
    per_k_groups = not per_chunk_groups(group_size, k, 128)
    stages = smem.fit_stages(block_m, block_n, 128, bits, 3 if block_m <= 32 else 2, per_k_groups, max_shared)
    return MoeConfig(block_m, block_n, 128, num_warps=4, num_stages=stages, split_k=split,
                     in_kernel_reduce=rule.get("in_kernel_reduce", True))


def per_chunk_groups(group_size: int, k: int, block_k: int) -> bool:
    """Whether every block_k-deep chunk lies in one group (else `_mac` loads per-k scale and zero tiles)."""
    return group_size >= k or group_size % block_k == 0


def shared_bytes(cfg: MoeConfig, bits: int, group_size: int, k: int) -> int:
    """smem.py's estimate of one `_moe_kernel` program's shared memory under `cfg`."""
    return smem.shared_bytes(cfg.block_m, cfg.block_n, cfg.block_k, bits, cfg.num_stages, not per_chunk_groups(group_size, k, cfg.block_k))


def split_rule(device: torch.device, split_k: int | None = None) -> dict:
    """The K-split rule for launches on `device`: its kernel table's "moe_split" (the default table's if it has
    none); split_k given: exactly that many splits (fewer where K has fewer chunks)."""
    if split_k is not None:
        return {"split_k": max(1, split_k), "min_chunks": 1}
    return _table.for_device(_device_name(device)).moe_split or _table.default_table().moe_split


def supports(n_part: int, bits: int) -> bool:
    """Whether `grouped_matmul` reads a projection of this part width and bit width."""
    return bits in (2, 4, 8) and n_part % 16 == 0


def grouped_matmul(
    x: torch.Tensor, sorted_ids: torch.Tensor, block_expert: torch.Tensor, w: Stacked, top_k: int, block_m: int,
    weights: torch.Tensor | None = None, interleave: bool = False, out: torch.Tensor | None = None, config: MoeConfig | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """out [S, P*NP]: row p = x[p // top_k] @ W_e^T (+ bias_e) (* weights[p]) for the expert e that `align` gave
    pair p; zero rows for sentinel pairs. x [T, K] in fp16 / bf16 (S = T * top_k), weights [S] or None.
    out: optional [S, P*NP] tensor of x's dtype to write into (tests poison it first).
    config: the launch (default `pick` with the device's split rule); split_k: with config None, that many K
    splits instead of the rule's (1: the single-pass kernel)."""
    e, parts, n_part, k = w.shape
    n = parts * n_part
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [rows, {k}], got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"activations must be fp16 or bf16, got {x.dtype}")
    if not supports(n_part, w.bits):
        raise ValueError(f"the grouped MoE kernel reads 2, 4 or 8 bits and parts of a multiple of 16 columns, not {w.bits} bits x {n_part}")
    groups = -(-k // w.group_size)
    if w.scales.shape != (e, parts, groups, n_part) or w.zeros.shape != w.scales.shape:
        raise ValueError(f"scales {tuple(w.scales.shape)} / zeros {tuple(w.zeros.shape)} do not fit [{e}, {parts}, {groups}, {n_part}]")
    for t in (w.qweight, w.scales, w.zeros, w.bias, sorted_ids, block_expert, weights):
        if t is not None and (t.device != x.device or not t.is_contiguous()):
            raise ValueError(f"every tensor must be contiguous and on {x.device}")
    n_blocks = block_expert.numel()
    if sorted_ids.numel() != n_blocks * block_m:
        raise ValueError(f"sorted_ids has {sorted_ids.numel()} slots, not {n_blocks} blocks of {block_m}: align with the same block_m")
    if x.stride(1) != 1:
        x = x.contiguous()
    s = x.shape[0] * top_k
    if weights is not None and weights.numel() != s:
        raise ValueError(f"weights must hold one router weight per pair ({s}), got {weights.numel()}")
    if out is None:
        out = torch.empty(s, n, dtype=x.dtype, device=x.device)
    elif out.shape != (s, n) or out.dtype != x.dtype or out.device != x.device or out.stride(1) != 1:
        raise ValueError(f"out must be a [{s}, {n}] {x.dtype} tensor on {x.device} with a contiguous last dimension")
    if s == 0 or n_blocks == 0:
        return out
    cfg = config or pick(block_m, parts, n_part, s, e, _sm_count(x.device), k=k, split_rule=split_rule(x.device, split_k),
                         bits=w.bits, group_size=w.group_size, max_shared=smem.max_shared(x.device))
    if cfg.block_m != block_m or n_part % cfg.block_n:
        raise ValueError(f"config {cfg} does not fit block_m {block_m} and part width {n_part}")
    chunks = triton.cdiv(k, cfg.block_k)
    per_split = triton.cdiv(chunks, max(1, cfg.split_k))
    split = triton.cdiv(chunks, per_split)  # no empty splits; the last may hold fewer chunks
    tiles = n_blocks * (n // cfg.block_n)
    # With a K split the partial sums meet in splitk.py's persistent workspace and each tile's last program
    # writes `out`; otherwise (the config says so, or a CUDA graph is being captured and the workspace would
    # have to grow) in a zeroed fp32 buffer, cast into `out` after the launch. Only shapes decide: no host sync.
    reduce, target, ws, counters = splitk.STORE, out, out, out
    if split > 1:
        pair = splitk.workspace(x.device, s * n, tiles) if cfg.in_kernel_reduce else None
        if pair is None:
            reduce, target = splitk.ATOMIC_BUFFER, torch.zeros(s, n, dtype=torch.float32, device=x.device)
        else:
            reduce, (ws, counters) = splitk.IN_KERNEL, pair
    group_per_chunk = per_chunk_groups(w.group_size, k, cfg.block_k)
    dot_f32 = interpreting() and x.dtype == torch.bfloat16
    magic = cfg.magic and group_per_chunk and not dot_f32 and (x.dtype == torch.float16 or w.bits <= 4)
    unpack4 = cfg.unpack4 and w.bits == 4 and group_per_chunk and cfg.block_m <= 32 and cfg.block_k % 128 == 0
    grid = (tiles, split)
    with device_guard(w.qweight):
        _moe_kernel[grid](
            x, w.qweight, w.scales, w.zeros, w.bias if w.bias is not None else x, weights if weights is not None else x, target,
            sorted_ids, block_expert, ws, counters,
            s, e, k, n_part, groups, n_blocks, per_split, split,
            x.stride(0), target.stride(0),
            TOP_K=top_k, PARTS=parts, INTERLEAVE=interleave and parts > 1, BITS=w.bits, GROUP_SIZE=w.group_size,
            HAS_BIAS=w.bias is not None, HAS_WEIGHT=weights is not None, GROUP_PER_CHUNK=group_per_chunk, SCALE_AFTER_DOT=group_per_chunk,
            MAGIC=magic, UNPACK4=unpack4, ASM=not interpreting(), DOT_F32=dot_f32, REDUCE=reduce,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out.copy_(target) if reduce == splitk.ATOMIC_BUFFER else out
