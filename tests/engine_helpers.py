"""Block-engine fixtures for algorithm tests: capture a real tiny model's block inputs and build contexts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.algorithms import BlockContext
from lowbit.arch import spec_for
from lowbit.calib.capture import capture_block_inputs
from lowbit.engine import BlockEngine, Stream


@dataclass
class Captured:
    engine: BlockEngine
    stream: Stream  # block 0's inputs


def capture(model, windows: torch.Tensor, batch_size: int = 4) -> Captured:
    spec = spec_for(model.config)
    plan = capture_block_inputs(model, model.get_submodule(spec.blocks), [{"input_ids": w.unsqueeze(0)} for w in windows], "cpu", "cpu", spec.state_kwargs)
    engine = BlockEngine(plan, "cpu", "cpu", batch_size)
    return Captured(engine, engine.stream())


def make_ctx(model, captured: Captured, scheme, index: int = 0, batch_size: int | None = None, spec=None, log=None) -> BlockContext:
    block = model.get_submodule(spec_for(model.config).blocks)[index]
    linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    engine = captured.engine
    if batch_size is not None:
        engine = BlockEngine(engine.plan, "cpu", "cpu", batch_size)
    return BlockContext(index=index, block=block, linears=linears, schemes={n: scheme for n in linears}, spec=spec or spec_for(model.config),
                        device=torch.device("cpu"), engine=engine, stream=captured.stream, log=log)


@torch.no_grad()
def block_outputs(ctx: BlockContext) -> torch.Tensor:
    """The block's outputs on every cached sample, [n, T, H]."""
    return torch.cat([ctx.forward(indices) for indices in ctx.batches()])
