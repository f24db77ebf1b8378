"""Shared memory of the dequantize-matmul launches, estimated from the tile sizes, and the stage count that fits.

Triton's software pipeliner gives every pipelined load of the K loop (num_stages - 1) shared-memory buffers; the
dequantized weight tile [BK, BN] goes through shared memory once more as the dot's B operand, and at BM >= 64
(wgmma) so does x's tile [BM, BK] as the A operand. The loads per chunk are x [BM, BK], the packed words
[BK * bits / 32, BN] int32 and, when groups are smaller than the chunk, per-k scale and zero tiles [BK, BN]
fp16 (matmul.py's `_mac`): those two dominate, 64 KB per stage at BK = BN = 128, and are what broke the H200.
Bytes (sm_90, Triton 3.6 and 3.9 alike):

    (num_stages - 1) * (2*BM*BK + BK*bits/8*BN + [per-k groups] 4*BK*BN) + 2*BK*BN + [BM >= 64] 2*BM*BK

It equals Triton's own figure (`CompiledKernel.metadata.shared`, offline compiles for sm_90: tests/unit/kernels/
test_shared_memory.py) for the magic / scale-after-dot / per-k paths of matmul.py's dot kernel and of moe.py, e.g.
278528 for a 4-bit g32 [32 x 128 x 128] tile at 4 stages, the launch that raised OutOfResources on the H200
(limit 232448) in a tiny Qwen3-MoE's attention prefill; it over-counts unpack4.py's path (its x reads are
gathers, not pipelined), which only errs on the safe side. Stages are a pure function of the shapes and the
device's limit, so CUDA graphs and torch.compile's fake implementations see the same launch every time.
"""

from __future__ import annotations

import functools

import torch

# Hopper's per-block opt-in limit (H100 / H200: 227 KB), for devices whose properties do not say
DEFAULT_MAX_SHARED = 232448


def shared_bytes(block_m: int, block_n: int, block_k: int, bits: int, num_stages: int, per_k_groups: bool, x_bytes: int = 2) -> int:
    """Estimated shared memory of one dot-kernel program (module docstring)."""
    per_stage = x_bytes * block_m * block_k + block_k * bits // 8 * block_n + (4 * block_k * block_n if per_k_groups else 0)
    operands = 2 * block_k * block_n + (x_bytes * block_m * block_k if block_m >= 64 else 0)
    return max(0, num_stages - 1) * per_stage + operands


def fit_stages(block_m: int, block_n: int, block_k: int, bits: int, num_stages: int, per_k_groups: bool, max_shared: int) -> int:
    """The most stages <= num_stages whose estimate fits max_shared (1, no pipelining, if none does)."""
    while num_stages > 1 and shared_bytes(block_m, block_n, block_k, bits, num_stages, per_k_groups) > max_shared:
        num_stages -= 1
    return num_stages


@functools.lru_cache(maxsize=16)
def _device_max_shared(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or DEFAULT_MAX_SHARED)


def max_shared(device: torch.device | None = None) -> int:
    """Shared memory one program may opt into on `device` (CUDA: its properties; otherwise the H100/H200 limit)."""
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return DEFAULT_MAX_SHARED
    return _device_max_shared(device.index if device.index is not None else torch.cuda.current_device())
