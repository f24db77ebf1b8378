"""Round-to-nearest on the per-group min/max grid: the baseline every calibrated method must beat."""

from __future__ import annotations

from ..config import RtnConfig
from ..quant import QuantResult, quantize_weight
from . import register_algorithm
from .base import BlockContext


def quantize_block(ctx: BlockContext, config=None) -> dict[str, QuantResult]:
    return {
        name: quantize_weight(linear.weight.data, ctx.schemes[name], bias=linear.bias)
        for name, linear in ctx.linears.items()
    }


register_algorithm(RtnConfig, quantize_block)
