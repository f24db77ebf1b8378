"""Which experts of a mixture-of-experts block are calibrated, on which tokens, and which fall back to RTN.

Before a MoE block is calibrated, one pass over the samples counts the tokens the router sends to each
expert (`lowbit_routed` on the unfused experts modules, arch/experts.py; summed over data-parallel
processes). Then:
- methods whose statistics are each linear's inputs (GPTQ, AWQ) with `moe_all_experts` on (the default) run
  every token through every expert while the block is calibrated: every expert is calibrated on every
  token; the block's output still keeps only the routed result;
- otherwise an expert routed fewer than `moe_min_tokens` tokens is quantized with RTN (AutoRound learns from
  the block's output, which an expert without tokens does not reach) and listed in the summary with its
  count; with `moe_all_experts` turned off, an expert routed no token at all stops the run with one line.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..arch.experts import experts_modules
from ..errors import LowbitError


@dataclass
class ExpertPlan:
    """routed: experts module (block-relative) -> routed tokens per expert [E];
    fallback: expert (block-relative, e.g. "mlp.experts.3") -> its routed tokens, for experts quantized with RTN;
    all_tokens: every token runs through every expert while the block is calibrated."""

    routed: dict[str, list[int]] = field(default_factory=dict)
    fallback: dict[str, int] = field(default_factory=dict)
    all_tokens: bool = False

    def falls_back(self, linear: str) -> bool:
        return any(linear.startswith(expert + ".") for expert in self.fallback)


@torch.no_grad()
def count_routed(engine, block: torch.nn.Module, index: int, stream) -> dict[str, list[int]]:
    """Routed tokens per expert of every experts module in the block, over every sample (and process)."""
    modules = experts_modules(block)
    for m in modules.values():
        m.lowbit_routed = torch.zeros(m.lowbit_layout.num_experts, dtype=torch.int64, device=engine.device)
    try:
        for indices in engine.batches(len(stream.hidden)):
            engine.call(block, index, stream, indices)
        return {n: [int(c) for c in engine.reduce_sum(m.lowbit_routed.double()).tolist()] for n, m in modules.items()}
    finally:
        for m in modules.values():
            m.lowbit_routed = None


def plan_experts(engine, block: torch.nn.Module, index: int, stream, prefix: str, calib, method_cfg) -> ExpertPlan | None:
    """The plan for one block (None: the block has no experts)."""
    if not experts_modules(block):
        return None
    plan = ExpertPlan(routed=count_routed(engine, block, index, stream), all_tokens=calib.moe_all_experts and method_cfg.reads_linear_inputs)
    if plan.all_tokens:
        return plan
    for name, counts in plan.routed.items():
        for e, n in enumerate(counts):
            if n == 0 and not calib.moe_all_experts:
                raise LowbitError(
                    f"expert {prefix}.{name}.{e} was routed no calibration token (all-expert calibration is off)",
                    "drop --no_moe_all_experts (every expert then sees every token), or calibrate on more or more varied samples",
                )
            if n < calib.moe_min_tokens:
                plan.fallback[f"{name}.{e}"] = n
    return plan


@contextmanager
def tokens_to_every_expert(block: torch.nn.Module, on: bool):
    """While on: every token goes through every expert of the block (outputs unchanged)."""
    modules = experts_modules(block).values() if on else ()
    for m in modules:
        m.lowbit_all_tokens = True
    try:
        yield
    finally:
        for m in modules:
            m.lowbit_all_tokens = False
