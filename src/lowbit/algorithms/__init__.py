"""Quantization methods as functions on one loaded block: `quantize_block(ctx, config) -> {name: QuantResult}`.

An algorithm may change the block's other parameters in place (AWQ folds scales into norms); the runner
writes whatever the block holds afterwards. It never does I/O or chooses devices.
"""

from __future__ import annotations

from typing import Callable

from .base import BlockContext

_ALGORITHMS: dict[str, tuple[Callable, bool]] = {}


def register_algorithm(name: str, fn: Callable, needs_calibration: bool) -> None:
    _ALGORITHMS[name] = (fn, needs_calibration)


def algorithm(name: str) -> tuple[Callable, bool]:
    from ..errors import LowbitError

    if name not in _ALGORITHMS:
        raise LowbitError(f"unknown method {name!r}", f"use one of: {', '.join(sorted(_ALGORITHMS))}")
    return _ALGORITHMS[name]


from . import autoround, awq, gptq, rtn  # noqa: E402,F401  (each registers itself)

__all__ = ["BlockContext", "algorithm", "register_algorithm"]
