"""GPTQ (Frantar et al., arXiv 2210.17323) on one block.

For a linear with weight W [N, K] and calibration inputs X [n, K], GPTQ minimises ||X W^T - X Q^T||^2
column by column: column j is rounded, and its error, divided by the diagonal of the inverse Hessian, is
spread over the columns not yet rounded through row j of the upper Cholesky factor U of H^-1, where
H = 2 X^T X / n. Updates are applied lazily: inside a block of `block_size` columns immediately, to the
columns after the block once per block (one matmul instead of one rank-1 update per column).

The grid is lowbit's: when the column loop enters a group, its (scale, zero) come from `compute_qparams`
on that group's *current* columns (already corrected by the errors of the columns before it, including
updates still pending for the columns past the current lazy block), so codes, scales and zeros are exactly
what the export formats store, partial last group included. With act_order the columns are visited by
decreasing H diagonal and the group parameters are computed up front on the original weight (static
groups): the codes stay in natural column order and no g_idx is needed.

Within a block the linears are quantized in the order the forward reaches them, grouped by shared input
(q/k/v, then o, then gate/up, then down: "true sequential"), each stage's Hessians accumulated by forward
hooks with the earlier stages' weights already quantized.
"""

from __future__ import annotations

import math
import re
import time

import torch

from ..config import GptqConfig, Scheme
from ..quant import QuantResult, quantize_weight
from ..quant.primitives import compute_qparams
from . import register_algorithm
from .base import BlockContext

MAX_DAMP_TRIES = 5  # dampening x10 per retry when H + damp I is still not positive definite


# ---------------------------------------------------------------- the math, as pure functions


def accumulate_hessian(h: torch.Tensor | None, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold inputs x [..., K] into the running mean H = 2 X^T X / n over all rows seen. Returns (H [K, K], n).

    Scaling the old sum by n / (n + m) before adding keeps H an average (no overflow in long runs).
    """
    x = x.reshape(-1, x.shape[-1]).float()  # [m, K]
    m = x.shape[0]
    if h is None:
        h = torch.zeros(x.shape[1], x.shape[1], device=x.device)
    h.mul_(n / (n + m))
    x = x * math.sqrt(2 / (n + m))
    h.addmm_(x.t(), x)
    return h, n + m


def inverse_hessian_factor(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp I)^-1, damp = damp_percent * mean(diag H); [K, K]."""
    eye = torch.eye(h.shape[0], device=h.device)
    damp = damp_percent * h.diagonal().mean()
    for _ in range(MAX_DAMP_TRIES):
        try:
            lower = torch.linalg.cholesky(h + damp * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            damp = damp * 10
    raise torch.linalg.LinAlgError(f"Hessian not positive definite even with dampening {damp:.3g}")


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    scheme: Scheme,
    block_size: int = 128,
    damp_percent: float = 0.01,
    act_order: bool = False,
) -> tuple[QuantResult, float]:
    """Quantize W [N, K] given H [K, K]. Returns (QuantResult on W's device, GPTQ's loss sum_j err_j^2 / 2).

    Dead inputs (H_jj = 0: the channel is always zero) get H_jj = 1 and W[:, j] = 0; they cannot change
    the output.
    """
    (result,), (loss,) = gptq_quantize_many(w[None], h[None], scheme, block_size, damp_percent, act_order)
    return result, loss


@torch.no_grad()
def gptq_quantize_many(
    w: torch.Tensor,
    h: torch.Tensor,
    scheme: Scheme,
    block_size: int = 128,
    damp_percent: float = 0.01,
    act_order: bool = False,
) -> tuple[list[QuantResult], list[float]]:
    """GPTQ of B same-shaped linears at once: W [B, N, K], each with its own H [B, K, K] (the experts of a
    mixture-of-experts block). The column loop runs once for all B (its kernels batched), so 128 experts
    cost about what one linear costs; each linear's arithmetic is the single-linear algorithm's."""
    W = w.detach().float().clone()  # [B, N, K], updated in place as errors are spread
    H = h.detach().float().clone()  # [B, K, K]
    nb, n_rows, k = W.shape
    gs = scheme.group_size_for(k)
    batch = torch.arange(nb, device=W.device)
    dead = H.diagonal(dim1=-2, dim2=-1) == 0  # [B, K]
    H.diagonal(dim1=-2, dim2=-1)[dead] = 1
    W.masked_fill_(dead[:, None, :], 0)
    scale = torch.zeros(nb, n_rows, scheme.groups(k), device=W.device)  # [B, N, G]
    zero = torch.zeros_like(scale)
    perm = torch.arange(k, device=W.device).expand(nb, k)  # [B, K] visiting order
    if act_order:  # static groups on the original weight, then visit columns by decreasing H_jj
        s, z = compute_qparams(W.reshape(nb * n_rows, k), scheme)
        scale, zero = s.view(nb, n_rows, -1), z.view(nb, n_rows, -1)
        perm = torch.argsort(H.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True)
        W = W.gather(2, perm[:, None, :].expand(nb, n_rows, k))
        H = H.gather(1, perm[:, :, None].expand(nb, k, k)).gather(2, perm[:, None, :].expand(nb, k, k))
    U = torch.stack([inverse_hessian_factor(H[b], damp_percent) for b in range(nb)])  # [B, K, K] upper
    groups = perm // gs  # [B, K] each visited column's group

    codes = torch.zeros_like(W)  # [B, N, K] in visiting order
    losses = torch.zeros(nb, n_rows, device=W.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, :, i1:i2].clone()  # [B, N, Bs] this lazy block, updated column by column
        err1 = torch.zeros_like(W1)  # [B, N, Bs] scaled errors, for the lazy update of the columns after i2
        U1 = U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not act_order and col % gs == 0:
                # entering a group: its current columns are W1[..., i:] inside the block plus the columns
                # past i2 with this block's pending update (errors of columns i1..col-1) applied
                end = min(col + gs, k)
                current = W1[:, :, i : end - i1]
                if end > i2:
                    pending = W[:, :, i2:end] - err1[:, :, :i] @ U[:, i1:col, i2:end]
                    current = torch.cat([current, pending], dim=2)
                s, z = compute_qparams(current.reshape(nb * n_rows, -1), scheme)  # one (possibly partial) group
                scale[:, :, col // gs], zero[:, :, col // gs] = s.view(nb, n_rows), z.view(nb, n_rows)
            g = groups[:, col]  # [B]
            s, z = scale[batch, :, g], zero[batch, :, g]  # [B, N]
            x = W1[:, :, i]
            q = ((x / s).round() + z).clamp(0, scheme.maxq)  # primitives.quantize_codes' formula, one column
            codes[:, :, col] = q
            e = (x - s * (q - z)) / U1[:, i, i, None]
            losses += e.pow(2) / 2
            W1[:, :, i:] -= e[:, :, None] @ U1[:, i : i + 1, i:]  # rank-1 update of this block's remaining columns
            err1[:, :, i] = e
        W[:, :, i2:] -= err1 @ U[:, i1:i2, i2:]  # the lazy batch update
    codes = codes.gather(2, torch.argsort(perm, dim=-1)[:, None, :].expand(nb, n_rows, k))  # back to natural column order
    results = [QuantResult(scheme, codes[b].to(torch.uint8), scale[b], zero[b].to(torch.uint8)) for b in range(nb)]
    return results, losses.sum(dim=1).tolist()


# ---------------------------------------------------------------- the block

SOLVE_BATCH = 32  # experts solved together: 32 x (W [N, K] + H, U [K, K]) fp32, ~1.3 GB at K = 2048, N = 1536


class _Stop(Exception):
    pass


@torch.no_grad()
def sequential_stages(ctx: BlockContext) -> list[list[str]]:
    """The block's linears in forward order, consecutive ones reading the same input tensor grouped.

    Found by running the block once on one sample with hooks; linears the forward never calls come last.
    """
    calls: list[tuple[str, torch.Tensor]] = []  # the tensors are kept alive so identity checks hold

    def hook(name):
        def fn(module, args):
            if all(n != name for n, _ in calls):
                calls.append((name, args[0]))

        return fn

    handles = [linear.register_forward_pre_hook(hook(n)) for n, linear in ctx.linears.items()]
    try:
        ctx.forward([0])
    finally:
        for h in handles:
            h.remove()
    stages: list[list[str]] = []
    for i, (name, x) in enumerate(calls):
        if i and x is calls[i - 1][1]:
            stages[-1].append(name)
        else:
            stages.append([name])
    called = {n for n, _ in calls}
    stages += [[n] for n in ctx.linears if n not in called]
    return merge_experts(stages)


def _role(name: str) -> str:
    """A linear's role in its block: experts of one module share roles (mlp.experts.3.gate_proj -> mlp.experts.*.gate_proj)."""
    return re.sub(r"(^|\.)experts\.\d+\.", r"\1experts.*.", name)


def merge_experts(stages: list[list[str]]) -> list[list[str]]:
    """Stages of experts' linears merged by role: the experts of a block read different token sets, so each
    expert would be its own stage (a pass over the samples each: hundreds per block); they do not feed
    each other, so all experts' gate/up form one stage and all their downs the next. Dense blocks: unchanged."""
    merged: list[list[str]] = []
    stage_of: dict[str, int] = {}
    for stage in stages:
        target = next((stage_of[_role(n)] for n in stage if _role(n) in stage_of), None)
        if target is None:
            merged.append([])
            target = len(merged) - 1
        for n in stage:
            stage_of.setdefault(_role(n), target)
            merged[target].append(n)
    return merged


@torch.no_grad()
def stage_hessians(ctx: BlockContext, names: list[str]) -> dict[str, tuple[torch.Tensor | None, int]]:
    """H and row count per linear over all cached inputs; each forward stops after the stage's last linear."""
    acc: dict[str, tuple[torch.Tensor | None, int]] = {n: (None, 0) for n in names}
    pending = set()

    def hook(name):
        def fn(module, args):
            acc[name] = accumulate_hessian(*acc[name], args[0])
            pending.discard(name)
            if not pending:
                raise _Stop

        return fn

    handles = [ctx.linears[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        for indices in ctx.batches():
            pending.update(names)
            try:
                ctx.forward(indices)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return {name: reduce_hessian(ctx, ctx.linears[name].in_features, h, n) for name, (h, n) in acc.items()}


def reduce_hessian(ctx: BlockContext, k: int, h: torch.Tensor | None, n: int) -> tuple[torch.Tensor | None, int]:
    """The mean Hessian over every process's rows: sum_p n_p H_p / sum_p n_p (one process: unchanged)."""
    if ctx.world_size == 1:
        return h, n
    total = ctx.reduce_sum(torch.tensor(float(n), dtype=torch.float64, device=ctx.device))  # rows: exact past 2^24
    weighted = ctx.reduce_sum(h * n if h is not None else torch.zeros(k, k, device=ctx.device))
    return (weighted / total if total > 0 else None), int(total.item())


def solve_groups(ctx: BlockContext, names: list[str], hessians: dict) -> list[list[str]]:
    """The stage's linears in solve batches: the experts of one module that play one role (same shape and
    scheme) are solved together (gptq_quantize_many), at most SOLVE_BATCH at a time; every other linear alone."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        if hessians[name][0] is None:
            continue
        linear = ctx.linears[name]
        key = (_role(name), linear.out_features, linear.in_features, ctx.schemes[name]) if _role(name) != name else (name,)
        groups.setdefault(key, []).append(name)
    return [g[i : i + SOLVE_BATCH] for g in groups.values() for i in range(0, len(g), SOLVE_BATCH)]


def owners(ctx: BlockContext, groups: list[list[str]]) -> list[int]:
    """Which process solves each batch of linears: the solve (the loop over K columns) does not shrink with
    the samples, so data-parallel processes split the batches instead of all solving all of them. Greedy by
    cost (~ B (N K + K^2)), largest first, onto the least-loaded rank; the same answer on every process."""
    def cost(group):
        linear = ctx.linears[group[0]]
        return len(group) * linear.in_features * (linear.in_features + linear.out_features)

    load = [0] * ctx.world_size
    out = [0] * len(groups)
    for i in sorted(range(len(groups)), key=lambda i: (-cost(groups[i]), groups[i][0])):
        rank = min(range(ctx.world_size), key=lambda r: (load[r], r))
        out[i] = rank
        load[rank] += cost(groups[i])
    return out


def shared_result(ctx: BlockContext, owner: int, result: QuantResult | None, loss: float, scheme: Scheme, n: int, k: int) -> tuple[QuantResult, float]:
    """The owner's QuantResult on every process: codes [N, K], scale and zero [N, G] and the loss, sent as one
    float32 buffer (small integers and the fp32 scales are exact through a sum with zeros)."""
    if ctx.world_size == 1:
        return result, loss
    g = scheme.groups(k)
    mine = None
    if result is not None:
        mine = torch.cat([result.codes.float().flatten(), result.scale.float().flatten(), result.zero.float().flatten(),
                          torch.tensor([loss], device=result.codes.device)])
    flat = ctx.engine.from_rank(owner, mine, (n * k + 2 * n * g + 1,), device=ctx.device)
    codes, scale, zero = flat[: n * k].view(n, k), flat[n * k : n * k + n * g].view(n, g), flat[n * k + n * g : -1].view(n, g)
    return QuantResult(scheme, codes.to(torch.uint8), scale, zero.to(torch.uint8)), float(flat[-1])


def quantize_block(ctx: BlockContext, config: GptqConfig | None = None) -> dict[str, QuantResult]:
    config = config or GptqConfig()
    if not ctx.linears or not ctx.calibrated:
        return {n: quantize_weight(l.weight.data, ctx.schemes[n], bias=l.bias) for n, l in ctx.linears.items()}
    started = time.time()
    ctx.block.eval()
    stages = sequential_stages(ctx) if config.true_sequential else [list(ctx.linears)]
    results, total = {}, 0.0
    for names in stages:
        hessians = stage_hessians(ctx, names)
        for name in names:
            if hessians[name][0] is None:  # never called: nothing to be faithful to
                linear = ctx.linears[name]
                results[name] = quantize_weight(linear.weight.data, ctx.schemes[name], bias=linear.bias)
        groups = solve_groups(ctx, names, hessians)
        for group, owner in zip(groups, owners(ctx, groups)):
            linears = [ctx.linears[n] for n in group]
            mine, losses = [None] * len(group), [0.0] * len(group)
            if owner == ctx.engine.rank:
                mine, losses = gptq_quantize_many(torch.stack([l.weight for l in linears]), torch.stack([hessians[n][0] for n in group]),
                                                  ctx.schemes[group[0]], config.block_size, config.damp_percent, config.act_order)
            for name, linear, result, loss in zip(group, linears, mine, losses):
                result, loss = shared_result(ctx, owner, result, loss, ctx.schemes[name], linear.out_features, linear.in_features)
                result.bias = None if linear.bias is None else linear.bias.detach().clone()
                results[name], total = result, total + loss
                # later stages must see this linear quantized (their inputs are recomputed through it)
                linear.weight.data = result.dequantize().to(linear.weight)
    if ctx.log:
        ctx.log(f"block {ctx.index}: gptq {len(stages)} stages, error {total:.4g}, {time.time() - started:.1f}s")
    return results


register_algorithm(GptqConfig, quantize_block)
