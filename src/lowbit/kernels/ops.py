"""Torch custom ops around the Triton kernels, so torch.compile (fullgraph) and CUDA graphs see one opaque
op per quantized linear instead of tracing into Triton's launcher.

    torch.ops.lowbit.quant_linear(x [..., K], qweight, scales, zeros, bias?, bits, group_size) -> [..., N]
    torch.ops.lowbit.dequantize(qweight, scales, zeros, bits, group_size, dtype) -> W^T [K, N]

Both take the internal layout of repack.py (zeros unpacked, fp16 [G, N]). Their fake implementations
give output shapes from input shapes alone. Each kernel launch runs under its weight's device
(triton/__init__.py: device_guard), so layers spread over GPUs by device_map="auto" work whatever the
current device is.
"""

from __future__ import annotations

import torch

from .repack import Packed
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
