"""One block's step, the same for both runners (runner.py: a checkpoint's decoder blocks; diffusion/runner.py:
a pipeline transformer's blocks), between loading the block and writing it:

  begin:    NaN / inf check of the loaded weights, the summary's quantized / kept lists, the fp chain carried
            through the block while its weights are still fp (the method's targets, when it wants them);
  quantize: the method's handler on the block through the block engine (BlockContext), linears it must not
            calibrate (MoE experts with too few routed tokens) by RTN, the block's losses recorded, and the
            quantized chain carried to the next block (through the quantized weights when the method asks).

The runners keep what differs: how a block is loaded (placement over devices, a pipeline's block slots), the
resume replay, MoE expert planning, and when shards are written and flushed.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from .algorithms import BlockContext, handler_for
from .config import MethodConfig, Scheme
from .engine import BlockEngine
from .errors import LowbitError
from .quant import QuantResult, quantize_weight
from .report import BlockPhases, RunSummary


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise LowbitError(f"weight {name} contains NaN or inf", "fix or re-export the checkpoint; non-finite weights cannot be quantized")


def set_dequantized(linears: dict, results: dict[str, QuantResult]) -> None:
    """Make each linear compute with its quantized weight (the next block must see quantized outputs)."""
    for name, result in results.items():
        w = linears[name].weight
        w.data = result.dequantize().to(device=w.device, dtype=w.dtype)


class BlockStep:
    """The method and the calibration chains of one run, applied block after block.

    engine: the block engine (None for methods without calibration); `stream` is the quantized chain (the
    inputs of the next block), `fp_stream` the fp model's own chain beside it when the method wants fp
    targets (AutoRound with quantized inputs), else None.
    """

    def __init__(self, method: MethodConfig, scheme: Scheme, spec, device: torch.device, summary: RunSummary, engine: BlockEngine | None = None,
                 log=None, phases: BlockPhases | None = None):
        self.phases = phases or (engine.phases if engine is not None else BlockPhases())
        self.method, self.handler = method, handler_for(method)
        self.scheme, self.spec, self.device, self.summary, self.log = scheme, spec, device, summary, log
        self.engine = engine
        self.stream = engine.stream() if engine is not None else None
        self.fp_stream = self.stream.copy() if engine is not None and method.fp_targets else None
        self.run_state: dict = {}  # the algorithm's own state across blocks (AutoRound's compiled code), owned by this run

    def begin(self, block: torch.nn.Module, index: int, prefix: str, linears: dict, kept: dict) -> list | None:
        """The block is loaded (fp weights): checked, listed, and the fp chain carried through it; returns the
        method's targets for it (the fp outputs per sample, as `BlockEngine.call` gives them), or None."""
        for pname, p in block.named_parameters():
            check_finite(f"{prefix}.{pname}", p)
        self.summary.kept_fp.update(kept)
        self.summary.quantized.extend(f"{prefix}.{n}" for n in linears)
        if self.fp_stream is None:
            return None
        with self.phases("targets"):
            self.fp_stream = self.engine.propagate(block, index, self.fp_stream)
        return self.engine.joint(self.fp_stream, index)

    def quantize(self, block: torch.nn.Module, index: int, linears: dict, targets: list | None, last: bool, rtn: frozenset = frozenset(),
                 around=nullcontext, routed: dict | None = None) -> dict[str, QuantResult]:
        """{linear: QuantResult} for every linear of `linears`: the method's, or RTN's for the names in `rtn`;
        `around()` is entered while the method runs; routed: the MoE routing counts (BlockContext.routed). Unless
        `last`, the quantized chain moves to the next block."""
        calibrated = {n: l for n, l in linears.items() if n not in rtn}
        ctx = BlockContext(index=index, block=block, linears=calibrated, schemes={n: self.scheme for n in calibrated}, spec=self.spec, device=self.device,
                           engine=self.engine, stream=self.stream, targets=targets, log=self.log, run_state=self.run_state, routed=routed)
        with around(), self.phases("method"):
            results = self.handler(ctx, self.method)
        results.update({n: quantize_weight(l.weight.data, self.scheme, bias=l.bias) for n, l in linears.items() if n in rtn})
        if ctx.losses:
            self.summary.block_losses.append((index, *ctx.losses))
        if self.stream is not None and not last:
            if self.method.quantized_inputs:
                set_dequantized(linears, results)
            with self.phases("propagate"):
                self.stream = self.engine.propagate(block, index, self.stream)
        return results

    def replayed(self, block: torch.nn.Module, index: int) -> None:
        """A resumed run's finished block, computing as written: only the quantized chain moves through it."""
        with self.phases("propagate"):
            self.stream = self.engine.propagate(block, index, self.stream)
