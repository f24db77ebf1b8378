"""Mixture-of-experts blocks: fused 3-D expert parameters as one 2-D linear per expert projection.

transformers 5 builds every MoE family's experts as one module holding 3-D parameters (`gate_up_proj`
[E, 2I, H] and `down_proj` [E, H, I]; gpt-oss transposed, [E, H, 2I] / [E, I, H], gate and up interleaved,
with biases) and marks the class with `@use_experts_implementation`, which records the layout on every
instance (`has_gate`, `has_bias`, `is_transposed`, `is_concatenated`, `has_post_expert_norm`) and makes its
forward dispatch on `config._experts_implementation` through `ALL_EXPERTS_FUNCTIONS`.

lowbit reads that layout (no per-family code) and *unfuses* the module in the meta skeleton: the 3-D
parameters are replaced by one child per expert, `experts.{i}`, holding an `nn.Linear` per projection
(`gate_proj` / `up_proj` / `down_proj`, or the names the checkpoint uses: Mixtral's w1 / w3 / w2, read from
transformers' own conversion rules). The module keeps its class, router and `_apply_gate`; its forward is
the experts implementation "lowbit" registered below, which runs each expert through its linears. So every
algorithm sees 2-D linears (hooks on an expert's linears see exactly the tokens routed to it), checkpoints
with per-expert tensors load by name, fused checkpoints load through slices (model/names.py), and exports
are written under the per-expert names that transformers' integrations and vLLM read.

Calibration switches live on the module (set by the runner around one block, never process-wide):
`lowbit_all_tokens` sends every token through every expert while the output keeps only the routed result
(so no expert starves: llm-compressor's default), `lowbit_routed` counts routed tokens per expert.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.modules import module as _nn_module  # the global hook registries

from ..errors import LowbitError

IMPLEMENTATION = "lowbit"
_FUSED = ("gate_up_proj", "up_proj", "down_proj")
_DEFAULT_NAMES = {"gate_up_proj": ("gate_proj", "up_proj"), "up_proj": ("up_proj",), "down_proj": ("down_proj",)}


@dataclass(frozen=True)
class ExpertLayout:
    """How one experts module's fused parameters map to per-expert linears.

    first: the fused input projection, "gate_up_proj" (gated: two linears) or "up_proj".
    names: per fused parameter, the per-expert linear names it splits into (in its row order).
    transposed: fused weights are [E, in, out] (gpt-oss) rather than [E, out, in].
    concatenated: gate and up rows are [gate; up]; False: interleaved [g0, u0, g1, u1, ...].
    bias: the fused parameters have `<name>_bias` companions [E, out].
    """

    first: str
    names: dict
    transposed: bool
    concatenated: bool
    bias: bool
    num_experts: int

    @property
    def gate(self) -> str | None:
        return self.names[self.first][0] if self.first == "gate_up_proj" else None

    @property
    def up(self) -> str:
        return self.names[self.first][-1]

    @property
    def down(self) -> str:
        return self.names["down_proj"][0]

    def linear_names(self) -> tuple[str, ...]:
        return tuple(n for fused in (self.first, "down_proj") for n in self.names[fused])

    def split(self, fused: str, weight: torch.Tensor) -> list[torch.Tensor]:
        """One expert's fused tensor ([out, in] after un-transposing, or a bias [out]) -> the per-linear parts
        in `names[fused]` order (the rows each linear owns)."""
        parts = len(self.names[fused])
        if parts == 1:
            return [weight]
        if self.concatenated:
            return list(weight.chunk(parts, dim=0))
        return [weight[i::parts] for i in range(parts)]

    def join(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """The fused projection's output [T, 2I] from the per-linear outputs [T, I] (what `_apply_gate` reads)."""
        if len(outputs) == 1:
            return outputs[0]
        if self.concatenated:
            return torch.cat(outputs, dim=-1)
        return torch.stack(outputs, dim=-1).flatten(-2)


class Expert(torch.nn.Module):
    """One expert's projections as nn.Linear children (created on whatever device is current: meta in a skeleton).

    row_weight: while every token runs through every expert, the weight of each row of the input its linears
    are being called on, [T] fp32 (1 + w for the rows routed to this expert, w for the others): statistics that
    read the linears' inputs (GPTQ's Hessians) weight their rows by it. None otherwise."""

    def __init__(self, shapes: dict[str, tuple[int, int]], bias: bool, dtype: torch.dtype):
        super().__init__()
        for name, (out_features, in_features) in shapes.items():
            self.add_module(name, torch.nn.Linear(in_features, out_features, bias=bias, dtype=dtype))
        self.row_weight: torch.Tensor | None = None


def expert_role(name: str) -> str:
    """A linear's role in its block: experts of one module share roles (mlp.experts.3.gate_proj -> mlp.experts.*.gate_proj)."""
    return re.sub(r"(^|\.)experts\.\d+\.", r"\1experts.*.", name)


def row_weight(block: torch.nn.Module, linear: str) -> Callable[[], torch.Tensor | None]:
    """For a linear of the block (block-relative name): a function giving its current input's row weights
    (an expert's linear while every token runs through every expert, see Expert) or None."""
    parent = block.get_submodule(linear.rpartition(".")[0]) if "." in linear else block
    return (lambda: parent.row_weight) if isinstance(parent, Expert) else (lambda: None)


def is_fused_experts(module: torch.nn.Module) -> bool:
    """A module built by transformers' `@use_experts_implementation` with 3-D parameters still in place."""
    return hasattr(module, "has_gate") and any(isinstance(getattr(module, n, None), torch.nn.Parameter) and getattr(module, n).dim() == 3 for n in _FUSED)


def experts_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """name -> experts module unfused by lowbit, in model order."""
    return {n: m for n, m in model.named_modules() if getattr(m, "lowbit_layout", None) is not None}


def _converter_names(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Per-expert linear names from transformers' conversion rules: a WeightConverter whose target is
    `experts.<fused>` and whose sources are `experts.*.<name>.weight` (Mixtral: w1 / w3 -> gate_up_proj)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:
        return {}
    out = {}
    try:
        transforms = get_model_conversion_mapping(model) or []
    except Exception:  # noqa: BLE001 - a young API; without it the default names are used
        return {}
    for t in transforms:
        if not isinstance(t, WeightConverter):
            continue
        targets = [re.search(r"experts\.(\w+)$", p) for p in t.target_patterns]
        sources = [re.search(r"experts\.\*\.(\w+)\.weight$", p) for p in t.source_patterns]
        if len(targets) == 1 and targets[0] and all(sources):
            out[targets[0].group(1)] = tuple(s.group(1) for s in sources)
    return out


def layout_of(module: torch.nn.Module, name: str, names_from_converters: dict) -> ExpertLayout:
    first = "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"
    missing = [p for p in (first, "down_proj") if not isinstance(getattr(module, p, None), torch.nn.Parameter)]
    if missing or getattr(module, "has_post_expert_norm", False) and not hasattr(module, "post_expert_norm"):
        raise LowbitError(
            f"experts module {name} ({type(module).__name__}) has a layout lowbit cannot map (no {', '.join(missing) or 'post_expert_norm'})",
            "quantize it with a lowbit that knows this layout, or report the model's experts class",
        )
    names = {p: names_from_converters.get(p, _DEFAULT_NAMES[p]) for p in (first, "down_proj")}
    if first == "gate_up_proj" and len(names[first]) != 2:
        raise LowbitError(f"experts module {name}: transformers' rules split gate_up_proj into {names[first]}", "report the model's experts class")
    return ExpertLayout(first, names, bool(getattr(module, "is_transposed", False)), bool(getattr(module, "is_concatenated", True)),
                        bool(getattr(module, "has_bias", False)), getattr(module, first).shape[0])


def unfuse_experts(model: torch.nn.Module) -> dict[str, ExpertLayout]:
    """Replace every fused experts module's 3-D parameters by per-expert linears (on the parameters' device:
    meta in a skeleton) and route its forward to the "lowbit" experts implementation. Returns name -> layout."""
    fused = {n: m for n, m in model.named_modules() if is_fused_experts(m)}
    if not fused:
        return {}
    register()
    from_converters = _converter_names(model)
    layouts = {}
    for name, module in fused.items():
        layout = layout_of(module, name, from_converters)
        shapes = {}
        for p in (layout.first, "down_proj"):
            w = getattr(module, p)  # [E, out, in], or [E, in, out] transposed
            out_f, in_f = (w.shape[2], w.shape[1]) if layout.transposed else (w.shape[1], w.shape[2])
            parts = len(layout.names[p])
            for n in layout.names[p]:
                shapes[n] = (out_f // parts, in_f)
        device, dtype = getattr(module, layout.first).device, getattr(module, layout.first).dtype
        for p in (layout.first, "down_proj"):
            delattr(module, p)
            if layout.bias:
                delattr(module, f"{p}_bias")
        with torch.device(device):
            for i in range(layout.num_experts):
                module.add_module(str(i), Expert(shapes, layout.bias, dtype))
        module.lowbit_layout = layout
        module.lowbit_all_tokens = False
        module.lowbit_unrouted_weight = None  # with lowbit_all_tokens: the row weight of unrouted tokens (None: all alike)
        module.lowbit_routed = None  # a [E] int64 tensor while the runner counts
        module.lowbit_count_only = False  # while counting: count the routes, run no expert (calib/experts.count_routed)
        module.lowbit_expert_parallel = None  # while AutoRound trains it on several processes (arch/expert_parallel.py)
        layouts[name] = layout
    set_implementation(model)
    return layouts


def set_implementation(model: torch.nn.Module) -> None:
    """Route the experts' forwards to "lowbit" (transformers' API where it exists, else the config field)."""
    setter = getattr(model, "set_experts_implementation", None)
    if setter is not None:
        try:
            setter(IMPLEMENTATION)
            return
        except Exception:  # noqa: BLE001 - older transformers validate names differently; fall through
            pass
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(module, "lowbit_layout"):
            config._experts_implementation = IMPLEMENTATION


@dataclass(frozen=True)
class FusedPart:
    """Where a per-expert tensor lives in a checkpoint that stores the experts fused: part `part` (in
    `layout.names[fused]` order) of expert `expert`'s slice of the 3-D tensor `key` (or of its bias [E, out])."""

    key: str
    layout: ExpertLayout
    fused: str
    expert: int
    part: int
    is_bias: bool

    def read(self, tensor: torch.Tensor) -> torch.Tensor:
        """The part out of the checkpoint tensor: weight [out, in] or bias [out]."""
        t = tensor[self.expert]
        if not self.is_bias and self.layout.transposed:
            t = t.t()  # [in, out] -> [out, in]
        return self.layout.split(self.fused, t)[self.part].contiguous()


def fused_sources(layout: ExpertLayout, prefix: str) -> dict[str, tuple[str, "FusedPart"]]:
    """Per-expert tensor name -> (the fused tensor's model name, where the part lives in it), for an experts
    module at `prefix` whose checkpoint keeps `{prefix}.gate_up_proj` [E, ...] etc. (the key is filled in by
    the name mapping)."""
    out = {}
    for fused in (layout.first, "down_proj"):
        for part, linear in enumerate(layout.names[fused]):
            for i in range(layout.num_experts):
                out[f"{prefix}.{i}.{linear}.weight"] = (f"{prefix}.{fused}", FusedPart("", layout, fused, i, part, False))
                if layout.bias:
                    out[f"{prefix}.{i}.{linear}.bias"] = (f"{prefix}.{fused}_bias", FusedPart("", layout, fused, i, part, True))
    return out


# ---------------------------------------------------------------- the experts implementation


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """hidden_states [T, H], top_k_index / top_k_weights [T, k] -> [T, H]: each expert's linears on its tokens,
    weighted by the router and summed (fp32 accumulation). With `lowbit_all_tokens` every expert runs on every
    token (its linears' hooks see them all, with `Expert.row_weight` naming the routed rows) and only the
    routed rows are kept."""
    parallel = getattr(self, "lowbit_expert_parallel", None)  # several processes training: each runs its own experts
    if parallel is not None and not self.lowbit_all_tokens and self.lowbit_routed is None:
        return parallel(self, hidden_states, top_k_index, top_k_weights)
    grouped = getattr(self, "lowbit_grouped", None)  # kernels/moe.py: all experts in one launch per projection
    if grouped is not None and not self.lowbit_all_tokens and self.lowbit_routed is None and grouped.applies(self, hidden_states):
        return grouped(self, hidden_states, top_k_index, top_k_weights)
    if not self.lowbit_all_tokens and self.lowbit_routed is None and dense_grouped_applies(self, hidden_states):
        return dense_grouped_forward(self, hidden_states, top_k_index, top_k_weights)
    layout: ExpertLayout = self.lowbit_layout
    num_experts, k = layout.num_experts, top_k_index.shape[-1]
    # the (token, slot) pairs grouped by expert with one stable sort and one host sync for all experts (a
    # `torch.where` per expert waits for the device once per expert: 128 waits per MoE forward and backward,
    # which kept the device idle); within an expert the pairs keep the row-major order torch.where gives
    flat = top_k_index.reshape(-1)  # [T * k], entry t * k + s; expert-parallel sentinels (>= E) sort last
    counts = torch.bincount(flat.clamp(max=num_experts), minlength=num_experts + 1)[:num_experts]  # [E]
    if self.lowbit_routed is not None:
        self.lowbit_routed += counts.to(self.lowbit_routed)
        if self.lowbit_count_only:  # the block's output is not used: the routes were all that was wanted
            return torch.zeros_like(hidden_states)
    order = torch.sort(flat, stable=True).indices  # [T * k]
    bounds = [0, *counts.cumsum(0).tolist()]
    out = torch.zeros(hidden_states.shape[0], hidden_states.shape[-1], dtype=torch.float32, device=hidden_states.device)
    for e in range(num_experts):
        if bounds[e + 1] == bounds[e] and not self.lowbit_all_tokens:  # no token routed to it
            continue
        pairs = order[bounds[e] : bounds[e + 1]]
        token, slot = pairs // k, pairs % k
        expert = getattr(self, str(e))
        x = hidden_states if self.lowbit_all_tokens else hidden_states[token]
        if self.lowbit_all_tokens and self.lowbit_unrouted_weight is not None:  # statistics: routed rows 1 + w, the others w
            expert.row_weight = torch.full((x.shape[0],), self.lowbit_unrouted_weight, dtype=torch.float32, device=x.device).index_add_(
                0, token, torch.ones(len(token), device=x.device))
        first = layout.join([getattr(expert, n)(x) for n in layout.names[layout.first]])
        h = self._apply_gate(first) if layout.first == "gate_up_proj" else self.act_fn(first)
        y = getattr(expert, layout.down)(h)
        expert.row_weight = None
        if getattr(self, "has_post_expert_norm", False):
            y = self.post_expert_norm(y)
        if self.lowbit_all_tokens:
            y = y[token]
        out.index_add_(0, token, y.float() * top_k_weights[token, slot, None].float())
    return out.to(hidden_states.dtype)


# ---------------------------------------------------------------- dense experts, grouped


def dense_weight(linear: torch.nn.Module) -> torch.Tensor | None:
    """A projection's dense weight [N, K] as its forward would use it: an nn.Linear's weight, or what a stand-in
    exposes through `dense_weight()` (AutoRound's fake-quant linears: W_hat, waited for when it is still
    arriving from another process); None for anything else (QuantLinears: the loop or kernels/moe.py)."""
    if type(linear) is torch.nn.Linear:
        return linear.weight
    fn = getattr(linear, "dense_weight", None)
    return fn() if callable(fn) else None


def stacked_weights(linears: list) -> torch.Tensor | None:
    """The linears' dense weights as one [E, N, K] tensor without a copy, when they are consecutive entries of
    one (AutoRound's W_hat buffers: `stacked()` gives (S, i)); None otherwise (the caller stacks them)."""
    fn = getattr(linears[0], "stacked", None)
    first = fn() if callable(fn) else None
    if first is None:
        return None
    stack, start = first
    for j, linear in enumerate(linears[1:], 1):
        fn = getattr(linear, "stacked", None)  # an expert outside the buffer (kept, or quantized with RTN): a Linear
        entry = fn() if callable(fn) else None
        if entry is None or entry[0] is not stack or entry[1] != start + j:
            return None
    return stack[start : start + len(linears)]


def hooked(module: torch.nn.Module) -> bool:
    """Someone watches this module's calls (GPTQ / AWQ statistics, accelerate's device hooks): it must be called."""
    return bool(module._forward_pre_hooks or module._forward_hooks or getattr(module, "_hf_hook", None) is not None)


@functools.lru_cache(maxsize=None)
def grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm, forward and backward, runs for `dtype` on `device` (a capability, found once
    per device and dtype: CUDA's kernel needs a recent GPU and 16-bit types; the CPU's reference runs all)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):  # the dtype itself, not autocast's
            x = torch.ones(16, 16, dtype=dtype, device=device, requires_grad=True)
            w = torch.ones(2, 16, 16, dtype=dtype, device=device, requires_grad=True)
            offs = torch.tensor([8, 16], dtype=torch.int32, device=device)
            y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
            y.backward(torch.ones_like(y))  # a real upstream gradient (its backward refuses stride-0 expanded ones)
        return bool(torch.all(y == 16).item()) and bool(torch.all(w.grad == 8).item())
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def dense_grouped_applies(module: torch.nn.Module, hidden_states: torch.Tensor) -> bool:
    """Every expert's projections are dense weights on the input's device, in one dtype, unhooked, with widths
    the grouped GEMM reads (multiples of 8 elements: CUDA's 16-byte alignment); nothing routes tokens outside
    the routed pairs (every-token statistics and the counting pass keep the loop)."""
    layout: ExpertLayout = module.lowbit_layout
    if dense_weight(getattr(getattr(module, "0"), layout.linear_names()[0])) is None or _global_hooks():
        return False  # quantized experts (the loop or kernels/moe.py), or someone watching every module
    dtypes = set()
    for e in range(layout.num_experts):
        expert = getattr(module, str(e))
        for name in layout.linear_names():
            linear = getattr(expert, name)
            w = None if hooked(linear) else dense_weight(linear)
            if w is None or w.device != hidden_states.device or w.dim() != 2 or w.shape[0] % 8 or w.shape[1] % 8:
                return False
            dtypes.add(w.dtype)
    return len(dtypes) == 1 and grouped_mm_runs(hidden_states.device, dtypes.pop())


def _global_hooks() -> bool:
    return bool(_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: torch._grouped_mm's backward refuses strided ones
    (gpt-oss's interleaved gate/up join gives every other column of the joined gradient)."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


STACK_BYTES = 1 << 30  # a projection's expert weights stacked per grouped GEMM at most (a module may set lowbit_stack_bytes)


def dense_grouped_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """experts_forward's result with each projection of all experts as one grouped GEMM (torch._grouped_mm over the
    (token, slot) pairs sorted by expert; `grouped_rows`): a few launches per layer and no host sync, instead of
    ~10 per expert (a 128-expert block's AutoRound step was bound by the host issuing the loop's launches).
    Differentiable in the weights (AutoRound trains W_hat through it) and the inputs.

    hidden_states [T, H], top_k_index / top_k_weights [T, k] -> [T, H] in hidden_states' dtype, accumulated in
    float32 as the loop does."""
    layout: ExpertLayout = self.lowbit_layout
    num_experts, k = layout.num_experts, top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)  # [P = T * k], pair t * k + s; expert-parallel sentinels (>= E) sort last
    order = torch.sort(flat, stable=True).indices  # [P], grouped by expert
    ids = flat[order]  # [P] ascending
    counts = torch.bincount(flat.clamp(max=num_experts), minlength=num_experts + 1)[:num_experts]  # [E]
    token, slot = order // k, order % k
    y = grouped_rows(self, hidden_states[token], ids, counts, [getattr(self, str(e)) for e in range(num_experts)])  # [P, H]
    weighted = torch.where((ids < num_experts)[:, None], y.float() * top_k_weights[token, slot, None].float(), 0.0)  # sentinels: 0
    out = torch.zeros(hidden_states.shape[0], hidden_states.shape[-1], dtype=torch.float32, device=hidden_states.device)
    return out.index_add_(0, token, weighted).to(hidden_states.dtype)


def grouped_rows(self, x: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, experts: list) -> torch.Tensor:
    """Each row of x through its expert's projections, gate and down (post-expert norm included; not weighted by
    the router): x [P, H] sorted by expert, ids [P] ascending, each row's index into `experts` (rows past the last
    expert, ids >= len(experts), come last and give rows of no meaning), counts [len(experts)] rows per expert ->
    [P, H] in the weights' dtype. One `torch._grouped_mm` per projection; the weights are read as one [E, N, K]
    tensor where they are one already (`stacked_weights`: AutoRound's W_hat buffers), else stacked per projection
    (a copy: each expert's weight is its own tensor), in chunks of experts when that copy would pass
    `lowbit_stack_bytes` (STACK_BYTES: 1 GiB; a DeepSeek-V3 projection is 7.5 GB of bf16 weights), which costs
    one host sync for the chunks' row bounds. `experts`: all of the module's (dense_grouped_forward) or those one
    process owns (arch/expert_parallel.py)."""
    layout: ExpertLayout = self.lowbit_layout
    num_experts = len(experts)
    ends = counts.cumsum(0).to(torch.int32)  # [E] each expert's end row
    budget = getattr(self, "lowbit_stack_bytes", STACK_BYTES)
    bounds: list[int] = []  # [0, ends...] on the host, read once (one sync) if a projection is stacked in chunks

    def grouped(x: torch.Tensor, weights: list[torch.Tensor], whole: torch.Tensor | None) -> torch.Tensor:
        """x [P, K], E weights [N, K] (whole: the same as one [E, N, K] tensor, or None) -> [P, N]"""
        if whole is not None:  # no copy, whatever its size
            return _ContiguousGrad.apply(torch._grouped_mm(x.to(whole.dtype), whole.transpose(-2, -1), offs=ends))
        size = max(1, budget // (weights[0].numel() * weights[0].element_size()))  # experts per stacked copy
        if size >= num_experts:
            w = torch.stack(weights)  # [E, N, K]
            return _ContiguousGrad.apply(torch._grouped_mm(x.to(w.dtype), w.transpose(-2, -1), offs=ends))
        if not bounds:
            bounds.extend([0, *ends.tolist()])
        parts = []
        for a in range(0, num_experts, size):  # each chunk's rows are contiguous
            b = min(num_experts, a + size)
            w = torch.stack(weights[a:b])  # [b - a, N, K]
            rows = x[bounds[a] : bounds[b]].to(w.dtype)
            if rows.shape[0] == 0:
                continue
            parts.append(_ContiguousGrad.apply(torch._grouped_mm(rows, w.transpose(-2, -1), offs=ends[a:b] - bounds[a])))
        parts.append(x.new_zeros(x.shape[0] - bounds[-1], weights[0].shape[0], dtype=weights[0].dtype))  # rows past the last expert
        return torch.cat(parts)

    def project(name: str, x: torch.Tensor) -> torch.Tensor:  # x [P, K] -> [P, N]
        linears = [getattr(ex, name) for ex in experts]
        y = grouped(x, [dense_weight(l) for l in linears], stacked_weights(linears))
        if linears[0].bias is not None:  # each row's expert's bias
            bias = torch.stack([l.bias for l in linears]).to(y.dtype)  # [E, N]
            y = y + bias[ids.clamp(max=num_experts - 1)]
        return y

    first = layout.join([project(n, x) for n in layout.names[layout.first]])
    h = self._apply_gate(first) if layout.first == "gate_up_proj" else self.act_fn(first)
    y = project(layout.down, h)  # [P, H]
    if getattr(self, "has_post_expert_norm", False):
        y = self.post_expert_norm(y)
    return y


_REGISTERED = False


def register() -> None:
    """Register "lowbit" in transformers' experts interface (once; a transformers without it: nothing to do)."""
    global _REGISTERED
    if _REGISTERED:
        return
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return
    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, experts_forward)
    _REGISTERED = True
