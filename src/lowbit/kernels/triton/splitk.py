"""Split-K partial sums reduced inside the kernel: one launch per linear, no zeroed buffer, no copy.

A K split spreads one output tile's K loop over `split` programs. The plain way (atomic adds into a zeroed
fp32 buffer, then a cast into the output) costs two extra launches per linear, a memset and a copy, which
in a decode step of 224 quantized linears are ~450 tiny kernels at ~2 µs each in a CUDA graph: measured on
an H100 (bench/decode.py, 2026-11-26), 32 layers of Llama-3-8B took 3.27 ms for the block linears at batch 1,
~30 µs per layer more than the GEMV's own bandwidth predicts.

Here each program writes its partial tile to a workspace ws [split, M, N] fp32 (torch.empty: no launch),
then counts itself in on the tile's lock (an int32 semaphore, acq_rel at GPU scope, after a CTA barrier so
every thread's stores are released with it). The program that arrives last sums the `split` partials in
split order (so the result is deterministic, unlike atomic adds), adds the bias, casts, stores the output
and resets the lock to 0 for the next launch. Workspace loads bypass L1 (.cg): other SMs wrote them.

The locks live in one persistent zeroed buffer per device (`locks`), allocated outside any CUDA graph
capture and kept for the process' lifetime, since captured graphs hold its address. Kernels on one device
run in stream order, so consecutive launches never share a lock at once; two lowbit matmuls running
concurrently on two streams of one device could, which lowbit never does (the caller falls back to the
atomic path when no buffer can be had).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Lock slots per device: output tiles of one split launch. The largest split launch pick_config makes is
# M <= 64 rows in 16-row tiles over N / 128 column tiles (N = 152064 for a Qwen vocabulary: 4752 tiles).
LOCK_SLOTS = 65536
_LOCKS: dict[torch.device, torch.Tensor] = {}


def locks(device: torch.device, tiles: int) -> torch.Tensor | None:
    """The device's zeroed lock buffer, or None when it cannot serve `tiles` tiles (too many, or it does not
    exist yet and a CUDA graph is being captured: memory allocated there belongs to the graph)."""
    device = torch.device(device)
    if tiles > LOCK_SLOTS:
        return None
    buf = _LOCKS.get(device)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = _LOCKS[device] = torch.zeros(LOCK_SLOTS, dtype=torch.int32, device=device)
    return buf


def workspace(split: int, m: int, n: int, device: torch.device) -> torch.Tensor:
    """ws [split, M, N] fp32 for the partial tiles (every element is written before it is read)."""
    return torch.empty(split, m, n, dtype=torch.float32, device=device)


@triton.jit
def arrive(locks_ptr, tile, split):
    """Count this program in on `tile`'s lock after its partial stores; True for the last of `split`."""
    tl.debug_barrier()  # every thread's workspace stores precede the release below
    arrived = tl.atomic_add(locks_ptr + tile, 1, sem="acq_rel")
    return arrived == split - 1


@triton.jit
def release(locks_ptr, tile):
    """Reset `tile`'s lock for the next launch (called by the last program once it has read the partials)."""
    tl.atomic_xchg(locks_ptr + tile, 0)


@triton.jit
def sum_partials(ws_ptr, offs, mask, split, plane):
    """sum over s in 0..split-1 of ws[s].flat[offs], in split order; `plane` = M * N elements per split."""
    total = tl.load(ws_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
    for s in range(1, split):
        total += tl.load(ws_ptr + s * plane + offs, mask=mask, other=0.0, cache_modifier=".cg")
    return total
