"""Quantization methods as functions on one loaded block: `quantize_block(ctx, config) -> {name: QuantResult}`.

The config's type picks the handler (torchao's pattern); what the runner must do for a method (capture
calibration samples, keep an fp chain, what to export as metadata) is declared by the config itself
(config.MethodConfig). An algorithm may change the block's other parameters in place (AWQ folds scales
into norms); the runner writes whatever the block holds afterwards. It never does I/O or chooses devices.
"""

from __future__ import annotations

from typing import Callable

from .base import BlockContext

_HANDLERS: dict[type, Callable] = {}


def register_algorithm(config_type: type, fn: Callable) -> None:
    _HANDLERS[config_type] = fn


def handler_for(config) -> Callable:
    return _HANDLERS[type(config)]


from . import autoround, awq, gptq, rtn  # noqa: E402,F401  (each registers itself)

__all__ = ["BlockContext", "handler_for", "register_algorithm"]
