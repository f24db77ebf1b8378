"""Grouped experts: an unfused experts module (arch/experts.py) run by the grouped MoE kernel (triton/moe.py).

lowbit.load gives every expert of an MoE layer its own QuantLinears (`experts.{i}.gate_proj` / `up_proj` /
`down_proj`, or the checkpoint's names); the "lowbit" experts implementation loops over the hit experts, ~3
launches each plus a host sync. `group_experts(model)` (called by lowbit.load) builds, once per experts module,
the stacked buffers the grouped kernel reads (repack.Stacked), two projections:

    first  gate and up (P = 2 parts, in `layout.names[layout.first]` order) or up alone (P = 1)
           qweight [E, P, H*bits/32, I], scales / zeros [E, P, G, I], bias [E, P, I]
    down   qweight [E, 1, I*bits/32, H], scales / zeros [E, 1, G', H], bias [E, 1, H]

registered as non-persistent buffers of the experts module (`lowbit_first_qweight`, ...: moved by `.to()`,
absent from state_dict), and replaces each expert QuantLinear's qweight / scales / zeros_fast / bias by its
[e, p] slice, a contiguous view: nothing is held twice and the per-expert loop still runs (CPU, calibration).
The kernel writes the first projection's output in the fused order the module's `_apply_gate` reads
(`layout.join`: [gate; up], or interleaved for gpt-oss), so the model's own gating runs unchanged between the
two launches.

`experts_forward` calls `module.lowbit_grouped(module, x, top_k_index, top_k_weights)` when `applies(module, x)`
(Triton can run on x's device: CUDA, or the CPU under TRITON_INTERPRET=1; x is fp16 / bf16 and on the weights'
device) and the runner is not calibrating through the module (its hooks must see each expert's tokens).
Everything between the launches is torch on the device (no .item(), no .tolist()), and the launches are the
custom ops `lowbit::moe_align` / `lowbit::moe_quant_matmul` (fake implementations included), so torch.compile
(fullgraph) and CUDA graphs take the whole layer.
"""

from __future__ import annotations

import torch

from ..arch.experts import experts_modules
from .linear import QuantLinear
from .repack import Stacked
from .triton import HAVE_TRITON, available

if HAVE_TRITON:
    from . import ops
    from .triton.moe import block_m_for, supports

_BUFFERS = ("qweight", "scales", "zeros", "bias")
_LINEAR_BUFFERS = {"qweight": "qweight", "scales": "scales", "zeros": "zeros_fast", "bias": "bias"}


def _stack(module: torch.nn.Module, proj: str, linears: list[list[QuantLinear]]) -> None:
    """Stack linears[e][p]'s kernel buffers into [E, P, ...] buffers `lowbit_{proj}_*` of `module`, and make
    each linear's buffers views of its slice."""
    for buf in _BUFFERS:
        attr = _LINEAR_BUFFERS[buf]
        if getattr(linears[0][0], attr) is None:
            module.register_buffer(f"lowbit_{proj}_{buf}", None, persistent=False)
            continue
        stacked = torch.stack([torch.stack([getattr(q, attr) for q in parts]) for parts in linears])
        module.register_buffer(f"lowbit_{proj}_{buf}", stacked, persistent=False)
        for e, parts in enumerate(linears):
            for p, q in enumerate(parts):
                setattr(q, attr, stacked[e, p])


def _why_not(linears: list[QuantLinear]) -> str | None:
    """Why these linears (one projection of every expert) cannot be stacked, or None."""
    if not all(isinstance(q, QuantLinear) for q in linears):
        return "an expert linear is not quantized"
    first = linears[0]

    def key(q: QuantLinear) -> tuple:
        return q.in_features, q.out_features, q.bits, q.group_size, q.qweight.device, None if q.bias is None else q.bias.dtype

    if any(key(q) != key(first) for q in linears):
        return "the experts' linears differ in shape, bits, groups, bias or device"
    if not supports(first.out_features, first.bits):
        return f"{first.bits}-bit experts of {first.out_features} outputs (the kernel reads 2/4/8 bits, widths divisible by 16)"
    return None


class GroupedExperts:
    """The grouped forward of one experts module (held as `module.lowbit_grouped`; its tensors live on the module)."""

    def __init__(self, module: torch.nn.Module):
        layout = module.lowbit_layout
        experts = [getattr(module, str(i)) for i in range(layout.num_experts)]
        first = [[getattr(ex, n) for n in layout.names[layout.first]] for ex in experts]
        down = [[getattr(ex, layout.down)] for ex in experts]
        flat = [q for parts in first for q in parts]
        reason = _why_not(flat) or _why_not([q for (q,) in down])
        if reason is None and flat[0].bits != down[0][0].bits:
            reason = "gate/up and down have different bits"
        if reason is None and flat[0].qweight.device != down[0][0].qweight.device:
            reason = "gate/up and down are on different devices"
        if reason is not None:
            raise ValueError(reason)
        for q in flat + [q for (q,) in down]:
            if q.zeros_fast is None or q.zeros_fast.device != q.qweight.device:
                q.post_load()
        _stack(module, "first", first)
        _stack(module, "down", down)
        self.num_experts = layout.num_experts
        self.gated = layout.first == "gate_up_proj"
        self.interleave = self.gated and not layout.concatenated
        self.bits = flat[0].bits
        self.group_first, self.group_down = flat[0].group_size, down[0][0].group_size
        self.split_k = 0  # K splits per tile: 0 the device's kernel table rule (few tokens: split), 1 none (benches)

    def stacked(self, module: torch.nn.Module, proj: str) -> Stacked:
        qweight, scales, zeros, bias = (getattr(module, f"lowbit_{proj}_{b}") for b in _BUFFERS)
        return Stacked(qweight, scales, zeros, bias, self.bits, self.group_first if proj == "first" else self.group_down)

    def applies(self, module: torch.nn.Module, x: torch.Tensor) -> bool:
        return (HAVE_TRITON and available(x.device) and x.dtype in (torch.float16, torch.bfloat16)
                and x.device == module.lowbit_first_qweight.device)

    def __call__(self, module: torch.nn.Module, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], top_k_index / top_k_weights [T, k] -> [T, H], as experts_forward's loop computes it."""
        tokens, top_k = top_k_index.shape
        first, down = self.stacked(module, "first"), self.stacked(module, "down")
        if tokens == 0:
            return x.new_zeros(0, down.qweight.shape[-1])
        block_m = block_m_for(tokens * top_k, self.num_experts)
        sorted_ids, block_expert = ops.moe_align(top_k_index, self.num_experts, block_m)
        h = ops.moe_quant_matmul(x, sorted_ids, block_expert, first.qweight, first.scales, first.zeros, first.bias, None,
                                 top_k, self.bits, first.group_size, self.interleave, block_m, self.split_k)  # [S, P * I], layout.join's order
        h = module._apply_gate(h) if self.gated else module.act_fn(h)  # [S, I]
        weights = top_k_weights.reshape(-1)  # [S], pair p = t * top_k + slot
        post_norm = getattr(module, "has_post_expert_norm", False)
        y = ops.moe_quant_matmul(h.contiguous(), sorted_ids, block_expert, down.qweight, down.scales, down.zeros, down.bias,
                                 None if post_norm else weights.contiguous(), 1, self.bits, down.group_size, False, block_m,
                                 self.split_k)  # [S, H]
        if post_norm:  # the norm sees the unweighted expert output, as in the loop
            y = module.post_expert_norm(y) * weights[:, None].to(y.dtype)
        return y.view(tokens, top_k, -1).sum(dim=1)  # fp32 accumulation inside the reduction, x's dtype out


def group_experts(model: torch.nn.Module) -> dict[str, str]:
    """Give every unfused experts module whose experts are compatible QuantLinears a GroupedExperts. Returns
    name -> why not, for the modules left to the per-expert loop."""
    skipped = {}
    if not HAVE_TRITON:
        return {name: "Triton is not installed" for name in experts_modules(model)}
    for name, module in experts_modules(model).items():
        try:
            module.lowbit_grouped = GroupedExperts(module)
        except ValueError as exc:
            skipped[name] = str(exc)
    return skipped
