"""Split-K partial sums reduced inside the matmul launch: one kernel per linear instead of three.

With SPLIT_K programs per output tile, each adds its fp32 partial [BM, BN] into a workspace. The plain way
needs a zero-fill before the kernel and a cast into the fp16/bf16 output after it: two extra launches per
linear (~2-3 µs each under CUDA graphs, 256 per token for 32 Llama blocks with fused q/k/v and gate/up),
which at decode sizes is a fifth of a 4096x4096 W4 matmul's time.

Here the workspace and a per-tile ticket counter persist per device and are kept at zero between launches:
each program adds its partial (relaxed atomics), waits for its own threads (barrier), then takes a ticket
(one acq_rel atomic, release covers the CTA's adds, as in CUTLASS' split-K semaphore). The program that
draws the last ticket swaps the tile's sums out of the workspace for zeros (atomic exchange: read at L2,
so no stale L1 line), writes them cast to the output and resets the ticket. No program waits on another,
so the order the programs run in does not matter.

The workspace is shared by every launch on a device: launches on one stream follow each other; two
streams of one device running split-K matmuls at the same time would race (lowbit launches on one).
It is allocated outside CUDA-graph capture only, never freed while the process runs (graphs keep its address) (allocation during capture would come from the graph's
private pool); a launch that needs a larger one while capturing falls back to the three-launch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# REDUCE constexpr of the kernels: how the K splits of one tile meet
STORE = 0  # one split: store into the output directly
ATOMIC_BUFFER = 1  # atomic adds into a zeroed fp32 buffer the caller casts afterwards (three launches)
IN_KERNEL = 2  # atomic adds into the persistent workspace, the last program casts and re-zeroes (one launch)


@triton.jit
def finish_tile(ws_ptrs, out_ptrs, mask, counter_ptr, n_splits):
    """Called by every program of a tile after its atomic adds into `ws_ptrs` ([BM, BN] pointers into the
    fp32 workspace); the last of the tile's `n_splits` programs writes the sum to `out_ptrs` (same shape)."""
    tl.debug_barrier()  # every thread's adds are issued before this program's ticket is taken
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if ticket == n_splits - 1:
        # as int32 bits: the same b32 exchange on the GPU, and the interpreter has no float exchange
        bits = tl.atomic_xchg(ws_ptrs.to(tl.pointer_type(tl.int32)), tl.zeros(ws_ptrs.shape, dtype=tl.int32), mask=mask, sem="relaxed")
        total = bits.to(tl.float32, bitcast=True)
        tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=mask)
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed")


_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
# Pairs replaced by larger ones stay allocated: a CUDA graph captured earlier holds their addresses and
# would otherwise replay into freed (reused) memory. Growth is geometric, so this is at most ~2x the largest.
_retired: list[tuple[torch.Tensor, torch.Tensor]] = []


def workspace(device: torch.device, numel: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(fp32 workspace of >= numel zeros, int32 counters of >= tiles zeros) for `device`, or None while a
    CUDA graph is being captured and the cached pair is too small (the caller then uses ATOMIC_BUFFER)."""
    device = torch.device(device)
    have = _workspaces.get(device)
    if have is not None and have[0].numel() >= numel and have[1].numel() >= tiles:
        return have
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    numel = max(numel, 2 * have[0].numel() if have else 0, 1 << 16)
    tiles = max(tiles, 2 * have[1].numel() if have else 0, 1 << 12)
    if have is not None:
        _retired.append(have)
    pair = (torch.zeros(numel, dtype=torch.float32, device=device), torch.zeros(tiles, dtype=torch.int32, device=device))
    _workspaces[device] = pair
    return pair
