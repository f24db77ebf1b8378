"""Float64 torch reference for the kernels: what every Triton kernel must compute, up to rounding."""

from __future__ import annotations

import torch

from ...quant.pack import unpack_bitstream
from ..repack import Packed


def dequantize_ref(p: Packed) -> torch.Tensor:
    """W^T [K, N] float64 = scale * (code - zero), group of input k = k // group_size."""
    n, k = p.shape
    codes = unpack_bitstream(p.qweight, p.bits, dim=0).double()  # [K, N]
    group = torch.arange(k, device=codes.device) // p.group_size  # [K]
    return (codes - p.zeros.double()[group]) * p.scales.double()[group]


def linear_ref(x: torch.Tensor, p: Packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] in float64."""
    out = x.double() @ dequantize_ref(p)
    return out if bias is None else out + bias.double()
