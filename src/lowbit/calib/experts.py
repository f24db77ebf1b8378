"""Which experts of a mixture-of-experts block are calibrated, on which tokens, and which fall back to RTN.

Before a MoE block is calibrated, one pass over the samples counts the tokens the router sends to each
expert (`lowbit_routed` on the unfused experts modules, arch/experts.py; summed over data-parallel
processes). Then:
- methods whose statistics are each linear's inputs (GPTQ, AWQ) with `moe_all_experts` on (the default) run
  every token through every expert while the block is calibrated, so no expert starves; the block's output
  still keeps only the routed result. By default every token counts alike (llm-compressor's weighting);
  `moe_unrouted_tokens` N weights an expert's rows instead (`Expert.row_weight`): its routed tokens 1 each,
  the others together as much as N routed ones (0: routed only). Measured (docs/moe.md): all alike gave the
  lowest held-out error per expert, routed-only the highest (too few tokens per expert: the Hessian overfits);
- otherwise an expert routed fewer than `moe_min_tokens` tokens is quantized with RTN (AutoRound learns from
  the block's output, which an expert without tokens does not reach) and listed in the summary with its
  count; with `moe_all_experts` turned off, an expert routed no token at all stops the run with one line.
"""

from __future__ import annotations

import math
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
    tokens: dict[str, int] = field(default_factory=dict)  # experts module -> calibration tokens it was called on
    unrouted_tokens: float = math.inf  # CalibConfig.moe_unrouted_tokens

    def falls_back(self, linear: str) -> bool:
        return any(linear.startswith(expert + ".") for expert in self.fallback)


@torch.no_grad()
def count_routed(engine, block: torch.nn.Module, index: int, stream) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Routed tokens per expert of every experts module in the block, and the tokens each module was called
    on, over every sample (and process).

    The pass's block output is thrown away, so with one experts module in the block (every MoE family lowbit
    knows) its experts are not run, only routed: nothing after them feeds a router. With several, the later
    routers read the earlier experts' outputs, and every expert runs."""
    modules = experts_modules(block)
    seen = {n: 0 for n in modules}

    def count(name):
        def fn(module, args, kwargs):
            seen[name] += (args[0] if args else kwargs["hidden_states"]).shape[0]  # hidden_states [T, H]
        return fn

    handles = [m.register_forward_pre_hook(count(n), with_kwargs=True) for n, m in modules.items()]
    for m in modules.values():
        m.lowbit_routed = torch.zeros(m.lowbit_layout.num_experts, dtype=torch.int64, device=engine.device)
        m.lowbit_count_only = len(modules) == 1
    try:
        for indices in engine.batches(len(stream.hidden)):
            engine.call(block, index, stream, indices)
        routed = {n: [int(c) for c in engine.reduce_sum(m.lowbit_routed.double()).tolist()] for n, m in modules.items()}
        tokens = engine.reduce_sum(torch.tensor([float(seen[n]) for n in modules], dtype=torch.float64, device=engine.device)).tolist()
        return routed, {n: int(t) for n, t in zip(modules, tokens)}
    finally:
        for h in handles:
            h.remove()
        for m in modules.values():
            m.lowbit_routed, m.lowbit_count_only = None, False


def plan_experts(engine, block: torch.nn.Module, index: int, stream, prefix: str, calib, method_cfg) -> ExpertPlan | None:
    """The plan for one block (None: the block has no experts)."""
    if not experts_modules(block):
        return None
    routed, tokens = count_routed(engine, block, index, stream)
    plan = ExpertPlan(routed=routed, all_tokens=calib.moe_all_experts and method_cfg.reads_linear_inputs, tokens=tokens,
                      unrouted_tokens=calib.moe_unrouted_tokens)
    if plan.all_tokens and plan.unrouted_tokens > 0:
        return plan  # every expert sees tokens (routed only, with weight 0 on the rest, starving ones fall back below)
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
def tokens_to_every_expert(block: torch.nn.Module, plan: ExpertPlan | None):
    """With a plan whose all_tokens is on: every token goes through every expert of the block (outputs
    unchanged), the tokens not routed to an expert weighted so that together they count as
    `plan.unrouted_tokens` routed ones."""
    modules = experts_modules(block) if plan is not None and plan.all_tokens else {}
    for name, m in modules.items():
        m.lowbit_all_tokens = True
        m.lowbit_unrouted_weight = None if math.isinf(plan.unrouted_tokens) else plan.unrouted_tokens / max(plan.tokens.get(name, 0), 1)
    try:
        yield
    finally:
        for m in modules.values():
            m.lowbit_all_tokens, m.lowbit_unrouted_weight = False, None
