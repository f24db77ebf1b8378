"""Round-to-nearest on the per-group min/max grid: the baseline every calibrated method must beat."""

from __future__ import annotations

from ..quant import QuantResult, quantize_weight
from . import register_algorithm
from .base import BlockContext


def quantize_block(ctx: BlockContext, config=None) -> dict[str, QuantResult]:
    return {
        name: quantize_weight(linear.weight.data, ctx.schemes[name], bias=linear.bias)
        for name, linear in ctx.linears.items()
    }


register_algorithm("rtn", quantize_block, needs_calibration=False)
