"""AWQ (Lin et al., arXiv 2306.00978) on one block: activation-aware scales, clipping, then RTN.

For each scale group of the architecture spec (linears that read the output of one `prev` op: a norm or
another linear) a per-input-channel scale s [K] is searched: s = x_mean^a (or, with duo scaling,
x_mean^a / w_mean^(1-a)), a on a grid of `n_grid` points in [0, 1), where x_mean is the mean |x| of the
group's input channel over the calibration tokens and w_mean the mean group-normalized |w| of that column.
Each candidate is scored by the output error of the group's sub-module (the deepest module holding all of
the group's linears: attention for q/k/v, the MLP for gate/up, the linear itself for o or down) with
quantized weights Q(W s) / s vs its full-precision output. The winner is folded in exactly: W[:, k] *= s_k,
and 1/s into `prev` (a norm's weight, or the previous linear's output rows), which leaves the block's
full-precision function unchanged. Then, per linear, a clipping of each group's max |w| is searched on
sampled tokens, and the scaled, clipped weights are rounded to nearest on lowbit's grid.

Search and application are split (llm-awq's auto_scale / auto_clip): `search_scales` and `search_clips`
return plain tensors (`AwqSearch`) and `apply` replays them onto a block, so a search can be cached,
resumed or sharded; `quantize_block` calls the very same apply functions, so replaying gives identical
weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import AwqConfig, Scheme
from ..engine import block_output
from ..errors import LowbitError
from ..quant import QuantResult, quantize_weight
from ..quant.primitives import fake_quantize, group_view
from . import register_algorithm
from .base import BlockContext

CLIP_TOKENS = 512  # tokens sampled per linear for the clipping search (llm-awq's n_sample_token)
CLIP_MAX_SHRINK = 0.5  # clipping never shrinks a group's max |w| below half
CLIP_ROWS = 1024  # output rows scored at once: bounds the [rows, tokens, G] error tensors


@dataclass
class GroupScale:
    """One searched scale: fold 1/scale into `prev`, scale into the input columns of `linears`; scale [K]."""

    prev: str
    linears: tuple[str, ...]
    scale: torch.Tensor


@dataclass
class AwqSearch:
    """Everything AWQ decided for one block, as plain CPU float32 tensors.

    scales: the folded scale groups, in the spec's order.
    clips: linear name -> max |w| per group [N, G] of the *scaled* weight.
    """

    scales: list[GroupScale] = field(default_factory=list)
    clips: dict[str, torch.Tensor] = field(default_factory=dict)


# ---------------------------------------------------------------- apply: the replay step


@torch.no_grad()
def apply_scales(block: torch.nn.Module, scales: list[GroupScale], norm_offset: float = 0.0) -> None:
    """Fold each scale into the block in place; the block's full-precision outputs do not change.

    y = prev(x) W^T = (prev(x) / s) (W s)^T: the linears' input columns are multiplied by s [K] and
    prev's output divided by it, as rows of a previous linear or as a norm's weight. A norm that computes
    x_hat * (offset + weight) gets weight' = (offset + weight) / s - offset.
    """
    for g in scales:
        prev = block.get_submodule(g.prev)
        s = g.scale.to(prev.weight.device, torch.float32)
        if isinstance(prev, torch.nn.Linear):
            prev.weight.data = (prev.weight.float() / s[:, None]).to(prev.weight.dtype)  # rows = prev's outputs
        else:
            prev.weight.data = ((prev.weight.float() + norm_offset) / s - norm_offset).to(prev.weight.dtype)
        if getattr(prev, "bias", None) is not None:
            prev.bias.data = (prev.bias.float() / s).to(prev.bias.dtype)
        for name in g.linears:
            w = block.get_submodule(name).weight  # on its own device when the block is spread over several
            w.data = (w.float() * s.to(w.device)[None, :]).to(w.dtype)  # [N, K] * [1, K]


def clip_weight(w: torch.Tensor, max_val: torch.Tensor, group_size: int) -> torch.Tensor:
    """W [N, K] with each group's entries clamped to [-max_val, max_val]; max_val [N, G]."""
    n, k = w.shape
    groups = group_view(w.float(), group_size)  # [N, G, gs]
    m = max_val.to(groups)[..., None]  # [N, G, 1]
    return torch.maximum(torch.minimum(groups, m), -m).reshape(n, -1)[:, :k]


@torch.no_grad()
def apply_clips(block: torch.nn.Module, clips: dict[str, torch.Tensor], schemes: dict[str, Scheme]) -> None:
    for name, max_val in clips.items():
        w = block.get_submodule(name).weight
        w.data = clip_weight(w, max_val, schemes[name].group_size).to(w.dtype)


def apply(block: torch.nn.Module, search: AwqSearch, schemes: dict[str, Scheme], norm_offset: float = 0.0) -> None:
    """Replay a search onto a freshly loaded block: scales first, then clipping (the order of the search)."""
    apply_scales(block, search.scales, norm_offset)
    apply_clips(block, search.clips, schemes)


# ---------------------------------------------------------------- statistics over the calibration set


def inspected_module(group_linears: tuple[str, ...]) -> str:
    """The deepest module holding all of the group's linears ('' = the block; a lone linear = itself)."""
    if len(group_linears) == 1:
        return group_linears[0]
    parts = [name.split(".")[:-1] for name in group_linears]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def usable_groups(ctx: BlockContext) -> list:
    """The spec's scale groups that fold exactly here: prev exists and its output width is the linears' K
    (v -> o fails this under grouped-query attention) and at least one of the linears is quantized."""
    out = []
    for g in ctx.spec.scale_groups:
        try:
            prev = ctx.block.get_submodule(g.prev)
            linears = [ctx.block.get_submodule(n) for n in g.linears]
        except AttributeError:
            continue
        width = prev.out_features if isinstance(prev, torch.nn.Linear) else prev.weight.shape[-1]
        if all(l.in_features == width for l in linears) and any(n in ctx.linears for n in g.linears):
            out.append(g)
    return out


@dataclass
class Stats:
    """Collected in one pass of the block over the calibration inputs.

    abs_sum / count: per linear, sum over tokens of |x| per input channel [K] and the token count.
    samples: per linear, up to CLIP_TOKENS input rows [T, K] spread evenly over all tokens; seen: rows
        seen so far per linear (where the sampling stride continues).
    calls: per inspected module, its (args, kwargs) for the first `max_calls` batches, tensors on `storage`.
    """

    abs_sum: dict = field(default_factory=dict)
    count: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)
    seen: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)

    def x_mean(self, name: str) -> torch.Tensor:
        return self.abs_sum[name] / self.count[name]


@torch.no_grad()
def collect(ctx: BlockContext, modules: list[str], max_calls: int) -> Stats:
    """One pass over this process's samples. Data-parallel: the processes' token counts place this one's
    tokens on the global stride (its rows start at `offset`), so the gathered clipping samples are exactly
    one process's; `abs_sum` / `count` are summed and `samples` gathered over processes (`reduce`)."""
    stats = Stats()
    counts = ctx.engine.counts(sum(t.shape[0] * t.shape[1] for t in ctx.stream.hidden))  # tokens per process
    offset = sum(counts[: ctx.engine.reducer.rank])
    stride = max(1, sum(counts) // CLIP_TOKENS)

    def linear_hook(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])  # [tokens, K]
            stats.abs_sum[name] = stats.abs_sum.get(name, 0) + x.abs().float().sum(0)
            stats.count[name] = stats.count.get(name, 0) + x.shape[0]
            start = stats.seen.get(name, offset)
            first = (-start) % stride  # the first row of this batch on the global stride
            stats.samples.setdefault(name, []).append(x[first::stride].float().to(ctx.storage))
            stats.seen[name] = start + x.shape[0]

        return hook

    def module_hook(name):
        def hook(module, args, kwargs):
            calls = stats.calls.setdefault(name, [])
            if len(calls) < max_calls:
                calls.append((ctx.engine.to_storage(args), ctx.engine.to_storage(kwargs)))

        return hook

    handles = [ctx.block.get_submodule(n).register_forward_pre_hook(linear_hook(n)) for n in ctx.linears]
    handles += [ctx.block.get_submodule(n).register_forward_pre_hook(module_hook(n), with_kwargs=True) for n in modules]
    try:
        for indices in ctx.batches():
            ctx.forward(indices)
    finally:
        for h in handles:
            h.remove()
    stats.samples = {n: torch.cat(s)[:CLIP_TOKENS] for n, s in stats.samples.items()}
    if ctx.world_size > 1:
        reduce(ctx, stats)
    return stats


def reduce(ctx: BlockContext, stats: Stats) -> None:
    """Complete a data-parallel process's statistics: abs_sum [K] and count summed, clipping samples
    [<= CLIP_TOKENS, K] gathered in rank order (every process then clips identically). Linears in the
    block's order, a linear this process never reached as zeros: every process makes the same calls."""
    for name, linear in ctx.linears.items():
        k = linear.in_features
        stats.abs_sum[name] = ctx.reduce_sum(stats.abs_sum.get(name, torch.zeros(k, device=ctx.device)))
        stats.count[name] = int(ctx.reduce_sum(torch.tensor(float(stats.count.get(name, 0)), dtype=torch.float64)).item())
        rows = stats.samples.get(name, torch.zeros(0, k, device=ctx.storage))
        stats.samples[name] = ctx.engine.gather_rows(rows)[:CLIP_TOKENS]
    for name in [n for n, c in stats.count.items() if c == 0]:
        del stats.abs_sum[name], stats.count[name], stats.samples[name]


# ---------------------------------------------------------------- search


def weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over output rows of |w| normalized by its group's max |w|, per input channel: [K]."""
    w = torch.cat([x.float().to(weights[0].device) for x in weights])  # [sum N, K]
    k = w.shape[1]
    g = group_view(w.abs(), group_size)  # [N, G, gs]
    g = g / g.amax(-1, keepdim=True).clamp(min=1e-8)
    return g.reshape(w.shape[0], -1)[:, :k].mean(0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, n_grid: int) -> list[tuple[float, torch.Tensor]]:
    """(alpha, s [K]) candidates; the first is s = 1 (no scaling) so the search is never worse than none.

    s = x_mean^a (/ w_mean^(1-a) with duo scaling), normalized to a geometric mid-range of 1 (llm-awq).
    """
    out = [(-1.0, torch.ones_like(x_mean))]
    for i in range(n_grid):
        a = i / n_grid
        if w_mean is None and i == 0:
            continue  # x_mean^0 is the identity already listed
        s = x_mean.pow(a) if w_mean is None else x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)
        s = s.clamp(min=1e-4)
        out.append((a, s / (s.max() * s.min()).sqrt()))
    return out


def module_output(module, args, kwargs, engine) -> torch.Tensor:
    return block_output(module(*engine.to_device(args), **engine.to_device(kwargs))).float()


@torch.no_grad()
def search_group(ctx: BlockContext, group, stats: Stats, config: AwqConfig) -> tuple[GroupScale, float, float]:
    """Grid-search one group's scale. Returns (the scale, loss of no scaling, best loss); block unchanged."""
    mod_name = inspected_module(group.linears)
    module = ctx.block.get_submodule(mod_name) if mod_name else ctx.block
    calls = stats.calls[mod_name]  # one (args, kwargs) per batch of ctx.batch_size windows
    quantized = [n for n in group.linears if n in ctx.linears]
    originals = {n: ctx.block.get_submodule(n).weight.data.clone() for n in quantized}
    targets = [module_output(module, a, k, ctx.engine) for a, k in calls]
    x_mean = stats.x_mean(quantized[0]).to(ctx.device)
    gs = ctx.schemes[quantized[0]].group_size
    w_mean = weight_mean(list(originals.values()), gs).to(ctx.device) if config.duo_scaling else None

    candidates = candidate_scales(x_mean, w_mean, config.n_grid)
    sums = []  # per candidate: the sum over this process's batches of the batch MSE
    try:
        for _, s in candidates:
            for n, w in originals.items():
                # Q(W s) / s: the quantized weight as the unscaled input sees it, [N, K], on the weight's device
                sw = s.to(w.device)
                q = fake_quantize(w.float() * sw[None, :], ctx.schemes[n]) / sw[None, :]
                ctx.block.get_submodule(n).weight.data = q.to(w.dtype)
            sums.append(sum(F.mse_loss(module_output(module, a, k, ctx.engine), t).item() for (a, k), t in zip(calls, targets)))
    finally:
        for n, w in originals.items():
            ctx.block.get_submodule(n).weight.data = w
    # mean batch MSE per candidate over every process's batches, [C]: all processes pick the same scale
    totals = ctx.reduce_sum(torch.tensor([*sums, len(calls)], dtype=torch.float64))
    losses = (totals[:-1] / totals[-1]).tolist()
    best = min(range(len(losses)), key=losses.__getitem__)  # the first of equal losses, as before
    return GroupScale(group.prev, tuple(group.linears), candidates[best][1].float().cpu()), losses[0], losses[best]


@torch.no_grad()
def search_clips(ctx: BlockContext, samples: dict[str, torch.Tensor], n_grid: int) -> dict[str, torch.Tensor]:
    """Per linear, the max |w| per group [N, G] minimising the group-wise output error on sampled tokens.

    For each group the error is the mean over tokens of (x_g . w_g - x_g . Q(clip(w))_g)^2, the part of
    the output that group contributes; ratios 1, 1 - 1/n_grid, ... down to CLIP_MAX_SHRINK.
    """
    clips = {}
    for name, linear in ctx.linears.items():
        scheme = ctx.schemes[name]
        w_all = linear.weight.float()  # on its own device when the block is spread over several
        x = group_view(samples[name].to(w_all.device), scheme.group_size)  # [T, G, gs]
        maxima = []
        for start in range(0, w_all.shape[0], CLIP_ROWS):
            w = w_all[start : start + CLIP_ROWS]  # [n, K]
            wg = group_view(w, scheme.group_size)  # [n, G, gs]
            ref = torch.einsum("tgc,ngc->ntg", x, wg)  # per-group partial outputs [n, T, G]
            org_max = wg.abs().amax(-1)  # [n, G]
            best_max, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
            for i in range(int(CLIP_MAX_SHRINK * n_grid)):
                max_val = org_max * (1 - i / n_grid)
                q = group_view(fake_quantize(clip_weight(w, max_val, scheme.group_size), scheme), scheme.group_size)
                err = (torch.einsum("tgc,ngc->ntg", x, q) - ref).pow(2).mean(1)  # [n, G]
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_max = torch.where(better, max_val, best_max)
            maxima.append(best_max)
        clips[name] = torch.cat(maxima).cpu()
    return clips


# ---------------------------------------------------------------- the block


@torch.no_grad()
def search(ctx: BlockContext, config: AwqConfig) -> tuple[AwqSearch, float, float]:
    """Search the block's scales, then its clipping. Returns (search, loss without scaling, best loss),
    summed over groups. The block ends with the search applied (the clipping search reads the scaled
    weights), by the same functions `apply` uses, so `apply` on a fresh copy gives identical weights."""
    groups = usable_groups(ctx)
    # data-parallel: each process scores its share of the search samples
    samples = ctx.n_samples if config.search_samples is None else -(-config.search_samples // ctx.world_size)
    max_calls = -(-samples // ctx.batch_size)  # batches whose windows score the grid
    with ctx.phase("stats"):
        stats = collect(ctx, [inspected_module(g.linears) for g in groups], max_calls)
    result, before, after = AwqSearch(), 0.0, 0.0
    for g in groups:
        with ctx.phase("search"):
            scale, loss0, loss = search_group(ctx, g, stats, config)
        result.scales.append(scale)
        before, after = before + loss0, after + loss
    stats.calls.clear()
    apply_scales(ctx.block, result.scales, ctx.spec.norm_weight_offset)
    if config.apply_clip:
        samples = dict(stats.samples)
        for g in result.scales:  # after folding, these linears read x / s
            for n in g.linears:
                if n in samples:
                    samples[n] = samples[n] / g.scale[None, :].to(samples[n])
        with ctx.phase("search"):
            result.clips = search_clips(ctx, samples, config.n_grid)
        apply_clips(ctx.block, result.clips, ctx.schemes)
    return result, before, after


def quantize_block(ctx: BlockContext, config: AwqConfig | None = None) -> dict[str, QuantResult]:
    config = config or AwqConfig()
    rtn = lambda: {n: quantize_weight(l.weight.data, ctx.schemes[n], bias=l.bias) for n, l in ctx.linears.items()}  # noqa: E731
    if not ctx.spec.scale_groups:
        if config.explicit:
            raise LowbitError("AWQ needs scale groups (linears sharing an input) and this architecture's spec declares none", "add scale_groups to its ArchSpec in src/lowbit/arch/families.py, or use --method rtn, gptq or autoround")
        if ctx.log and ctx.index == 0:
            ctx.log("awq: this architecture declares no scale groups; falling back to RTN")
        return rtn()
    if not ctx.linears or not ctx.calibrated:
        return rtn()
    started = time.time()
    ctx.block.eval()
    result, before, after = search(ctx, config)
    ctx.losses = (before, after)
    if ctx.log:
        ctx.log(f"block {ctx.index}: awq {len(result.scales)} scale groups, loss {before:.4g} -> {after:.4g}, {time.time() - started:.1f}s")
    return rtn()  # round-to-nearest on the scaled, clipped weights


register_algorithm(AwqConfig, quantize_block)
