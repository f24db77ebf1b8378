"""Torch custom ops around the Triton kernels, so torch.compile (fullgraph) and CUDA graphs see one opaque
op per quantized linear instead of tracing into Triton's launcher.

    torch.ops.lowbit.quant_linear(x [..., K], qweight, scales, zeros, bias?, bits, group_size) -> [..., N]
    torch.ops.lowbit.dequantize(qweight, scales, zeros, bits, group_size, dtype) -> W^T [K, N]
    torch.ops.lowbit.moe_align(top_k_index [T, k], num_experts, block_m) -> (sorted_ids, block_expert)
    torch.ops.lowbit.moe_quant_matmul(x, sorted_ids, block_expert, qweight, scales, zeros, bias?, weights?,
                                      top_k, bits, group_size, interleave, block_m, split_k=0) -> [T * top_k, P * NP]

They take the internal layouts of repack.py (zeros unpacked, fp16 [G, N]; `Stacked` for the MoE ops, whose
sizes depend on shapes alone, never on the routing, so CUDA graphs replay them). Their fake implementations
give output shapes from input shapes alone. Each kernel launch runs under its weight's device
(triton/__init__.py: device_guard), so layers spread over GPUs by device_map="auto" work whatever the
current device is.
"""

from __future__ import annotations

import torch

from .repack import Packed, Stacked
from .triton import moe as _moe
from .triton.dequant import dequantize as _dequantize
from .triton.matmul import quant_matmul


@torch.library.custom_op("lowbit::quant_linear", mutates_args=())
def quant_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    p = Packed(qweight, scales, zeros, bits, group_size)
    n, k = p.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)  # [M, K]
    if x2.shape[0] == 0:
        return x.new_empty(*lead, n)
    return quant_matmul(x2, p, bias).reshape(*lead, n)


@quant_linear.register_fake
def _(x, qweight, scales, zeros, bias, bits, group_size):
    return x.new_empty(*x.shape[:-1], qweight.shape[1])


@torch.library.custom_op("lowbit::dequantize", mutates_args=())
def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    return _dequantize(Packed(qweight, scales, zeros, bits, group_size), dtype)


@dequantize.register_fake
def _(qweight, scales, zeros, bits, group_size, dtype):
    return qweight.new_empty(qweight.shape[0] * 32 // bits, qweight.shape[1], dtype=dtype)


@torch.library.custom_op("lowbit::moe_align", mutates_args=())
def moe_align(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _moe.align(top_k_index, num_experts, block_m)


@moe_align.register_fake
def _(top_k_index, num_experts, block_m):
    n_blocks = _moe.max_blocks(top_k_index.numel(), num_experts, block_m)
    return (top_k_index.new_empty(n_blocks * block_m, dtype=torch.int32), top_k_index.new_empty(n_blocks, dtype=torch.int32))


@torch.library.custom_op("lowbit::moe_quant_matmul", mutates_args=())
def moe_quant_matmul(
    x: torch.Tensor, sorted_ids: torch.Tensor, block_expert: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    bias: torch.Tensor | None, weights: torch.Tensor | None, top_k: int, bits: int, group_size: int, interleave: bool, block_m: int,
    split_k: int = 0,
) -> torch.Tensor:
    """split_k: K splits per tile; 0 = the device's kernel table rule (triton/moe.py: `split_rule`), 1 = none."""
    w = Stacked(qweight, scales, zeros, bias, bits, group_size)
    return _moe.grouped_matmul(x, sorted_ids, block_expert, w, top_k, block_m, weights=weights, interleave=interleave,
                               split_k=split_k or None)


@moe_quant_matmul.register_fake
def _(x, sorted_ids, block_expert, qweight, scales, zeros, bias, weights, top_k, bits, group_size, interleave, block_m, split_k=0):
    return x.new_empty(x.shape[0] * top_k, qweight.shape[1] * qweight.shape[3])
