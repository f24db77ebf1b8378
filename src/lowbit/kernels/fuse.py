"""Fuse quantized linears that read the same input into one launch (q/k/v, gate/up): fewer, larger kernels.

A decode step runs every linear at M = 1..8, where small layers are latency-bound (Llama-3-8B's k/v,
4096x1024, take 6 µs to read 2 MB on an H100). The architecture spec already names the linears that share an
input (its AWQ scale groups: norm -> q/k/v, norm -> gate/up); their packed weights concatenate along N in the
internal layout (qweight [K*bits/32, N], scales / zeros [G, N]), so one QuantLinear computes all of them.

The model code still calls q_proj(x), k_proj(x), v_proj(x) one by one. Each becomes a `FusedSlice` that, on
the first call with a given x, runs the fused layer once and keeps the output [..., N_total]; the other members
return their slice of it when called with the same tensor (`is`), and the last one drops the reference. A
member called with another input recomputes, so the result is always that of the separate layers.

Runtime only: a fused model's state_dict is not a checkpoint layout (save before fusing).
"""

from __future__ import annotations

import torch

from ..quant.pack import pack_bitstream
from .linear import QuantLinear


class SharedInput:
    """The fused layer's latest output, held until each member has read its slice of it."""

    def __init__(self, members: int):
        self.members = members
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.left = 0


class FusedSlice(torch.nn.Module):
    """Stands in for one member linear: out[..., start:stop] of the fused layer on the same input."""

    def __init__(self, fused: QuantLinear, shared: SharedInput, start: int, stop: int, owner: bool):
        super().__init__()
        if owner:  # the fused layer's buffers belong to the first member only (moved, counted once)
            self.fused = fused
        else:
            self.__dict__["_fused_ref"] = fused  # not a submodule: no second copy in state_dict / .to()
        self.shared, self.start, self.stop = shared, start, stop
        self.in_features, self.out_features = fused.in_features, stop - start

    def _layer(self) -> QuantLinear:
        return self.fused if "fused" in self._modules else self.__dict__["_fused_ref"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared
        if shared.left == 0 or shared.x is not x:
            shared.x, shared.y, shared.left = x, self._layer()(x), shared.members
        y = shared.y[..., self.start : self.stop]
        shared.left -= 1
        if shared.left == 0:
            shared.x = shared.y = None
        return y


def concat_quantlinears(layers: list[QuantLinear]) -> QuantLinear:
    """One QuantLinear whose output is the members' outputs side by side (same K, bits, group, format)."""
    first = layers[0]
    n = sum(q.out_features for q in layers)
    has_bias = any(q.bias is not None for q in layers)
    bias_dtype = next((q.bias.dtype for q in layers if q.bias is not None), torch.float16)
    fused = QuantLinear(first.in_features, n, first.bits, first.group_size, bias=has_bias, zero_offset=first.zero_offset,
                        dtype=bias_dtype, device="meta")  # every buffer is replaced below
    fused.qweight = torch.cat([q.qweight for q in layers], dim=1)  # [K*bits/32, N]
    fused.scales = torch.cat([q.scales for q in layers], dim=1)  # [G, N]
    fused.qzeros = pack_bitstream(torch.cat([q.zeros() for q in layers], dim=1) - first.zero_offset, first.bits, dim=1)
    if has_bias:
        fused.bias = torch.cat([q.bias if q.bias is not None else torch.zeros(q.out_features, dtype=bias_dtype, device=first.qweight.device)
                                for q in layers])
    fused.cache_dequantized = first.cache_dequantized
    fused.post_load()
    return fused


def fusable(layers: list) -> bool:
    if len(layers) < 2 or not all(isinstance(q, QuantLinear) for q in layers):
        return False
    first = layers[0]
    return all(
        (q.in_features, q.bits, q.group_size, q.zero_offset, q.qweight.device, q.scales.dtype)
        == (first.in_features, first.bits, first.group_size, first.zero_offset, first.qweight.device, first.scales.dtype)
        and (q.out_features * q.bits) % 32 == 0
        for q in layers
    )


def fuse_shared_inputs(model: torch.nn.Module, spec) -> int:
    """Fuse every scale group of `spec` whose members are compatible QuantLinears; returns how many groups."""
    count = 0
    for block in model.get_submodule(spec.blocks):
        for group in spec.scale_groups:
            names = [n for n in group.linears if _has(block, n)]
            layers = [block.get_submodule(n) for n in names]
            if len(names) != len(group.linears) or not fusable(layers):
                continue
            fused = concat_quantlinears(layers)
            shared = SharedInput(len(layers))
            start = 0
            for i, (name, q) in enumerate(zip(names, layers)):
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, child,
                        FusedSlice(fused, shared, start, start + q.out_features, owner=i == 0))
                start += q.out_features
            count += 1
    return count


def _has(module: torch.nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False
