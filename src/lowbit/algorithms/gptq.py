"""GPTQ (Frantar et al., arXiv 2210.17323) on one block.

For a linear with weight W [N, K] and calibration inputs X [n, K], GPTQ minimises ||X W^T - X Q^T||^2
column by column: column j is rounded, and its error, divided by the diagonal of the inverse Hessian, is
spread over the columns not yet rounded through row j of the upper Cholesky factor U of H^-1, where
H = 2 X^T X / n. Updates are applied lazily: inside a block of `block_size` columns immediately, to the
columns after the block once per block (one matmul instead of one rank-1 update per column). Inside a
lazy block the columns are solved in segments (cut where a group starts) by `solve_columns`: a torch loop
on the CPU, one fused Triton launch per segment on CUDA, where a loop of small launches per column would
make the solve, not the calibration data, the cost of a block (and the part data parallelism cannot split).

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
import time

import torch

from ..arch.experts import expert_role, row_weight
from ..config import GptqConfig, Scheme
from ..quant import QuantResult, quantize_weight
from ..quant.primitives import compute_qparams
from . import register_algorithm
from .base import BlockContext

MAX_DAMP_TRIES = 5  # dampening x10 per retry when H + damp I is still not positive definite


# ---------------------------------------------------------------- the math, as pure functions


def accumulate_hessian(h: torch.Tensor | None, n: float, x: torch.Tensor, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Fold inputs x [..., K] into the running mean H = 2 X^T X / n over all rows seen. Returns (H [K, K], n).

    weight [rows] (an expert's routed rows while every token runs through every expert, arch/experts.py):
    the weighted mean 2 X^T diag(w) X / sum(w), n then the sum of the weights.
    Scaling the old sum by n / (n + m) before adding keeps H an average (no overflow in long runs).

    16-bit x without weights (the calibration of a GPU run: its blocks compute in bf16 / fp16): X^T X is one
    16-bit GEMM with a float32 result (`gram`); a product of two bf16 (fp16) values is exact in float32, and
    the sum is accumulated in float32, so H equals the float32 GEMM of the upcast inputs but for the order of
    the additions (the same noise as a data-parallel reduction), at tensor-core speed: the float32 GEMMs
    were most of a Llama-3-8B block's GPTQ time on an H200 (2 x 262144 x (3 x 4096^2 + 14336^2) ~ 134 TFLOP
    at ~50 TFLOP/s). Float32 x (the CPU) keeps the float32 path.
    """
    x = x.reshape(-1, x.shape[-1])  # [m, K]
    m = x.shape[0] if weight is None else float(weight.sum())
    if m == 0:  # nothing seen (all weights 0): no Hessian yet, not a zero one (which would zero the weight)
        return h, n
    if h is None:
        h = torch.zeros(x.shape[1], x.shape[1], device=x.device)
    h.mul_(n / (n + m))
    if weight is None and x.dtype in (torch.bfloat16, torch.float16):
        h.add_(gram(x), alpha=2 / (n + m))
        return h, n + m
    x = x.float() * math.sqrt(2 / (n + m))
    if weight is not None:
        x = x * weight.to(x.device, torch.float32).sqrt()[:, None]
    h.addmm_(x.t(), x)
    return h, n + m


def gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X [K, K] float32 of 16-bit x [m, K]: one 16-bit GEMM with a float32 output on CUDA (torch >= 2.8's
    out_dtype; products exact, float32 accumulation); elsewhere the float32 GEMM of the upcast x (exact
    products too)."""
    if x.is_cuda:
        try:
            return torch.mm(x.t(), x, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without out_dtype: the float32 GEMM
            pass
    x = x.float()
    return x.t() @ x


PANEL = 1024  # columns of U per triangular solve (inverse_hessian_factor)


def inverse_hessian_factor(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp I)^-1, damp = damp_percent * mean(diag H); [K, K].

    One factorisation and one triangular inverse: with R the Cholesky factor of H + damp I taken in reversed
    order (H + damp I = R R^T, R upper: the lower factor of the flipped matrix, flipped back), U = R^-1 is
    upper with a positive diagonal and U^T U = R^-T R^-1 = (R R^T)^-1, so it is the factor (which is unique).
    R^-1 is solved in column panels: columns [a, b) of R^-1 are zero below row b, so each panel is
    solve_triangular(R[:b, :b], I[:b, a:b]), ~K^3 / 3 multiply-adds in all instead of K^3 for the whole
    identity. The factor -> inverse -> factor of H^-1 this replaces took 0.22 s at K = 14336 on an H200, 78%
    of down_proj's whole solve, and every data-parallel process pays it (bench/dist_gpu.py, gptq_solve).
    """
    k = h.shape[0]
    eye = torch.eye(k, device=h.device)
    damp = damp_percent * h.diagonal().mean()
    for _ in range(MAX_DAMP_TRIES):
        lower, info = torch.linalg.cholesky_ex((h + damp * eye).flip(0, 1))
        if int(info) == 0:
            r = lower.flip(0, 1)  # [K, K] upper
            u = torch.zeros_like(r)
            for a in range(0, k, PANEL):
                b = min(a + PANEL, k)
                u[:b, a:b] = torch.linalg.solve_triangular(r[:b, :b], eye[:b, a:b], upper=True)
            return u
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


def solve_columns(w: torch.Tensor, u: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round S columns one after another, each column's error spread over the columns after it, for B
    linears at once.

    w [B, N, S] the columns (not modified), u [B, S, S] the upper Cholesky factor of H^-1 restricted to them,
    s / z [B, N, S] each column's scale and zero. Returns (codes q [B, N, S], scaled errors e [B, N, S]),
    float32: q_i = clamp(round(x_i / s_i) + z_i), e_i = (x_i - s_i (q_i - z_i)) / u_ii, then W[..., j >= i] -=
    e_i u_ij. On CUDA one fused Triton launch (kernels/triton/gptq.py: the loop is launch-bound there); this
    loop is its reference and the CPU path."""
    if w.is_cuda:
        from ..kernels.triton.gptq import gptq_columns

        return gptq_columns(w, u, s, z, maxq)
    wt = torch.empty(w.shape[0], w.shape[2], w.shape[1], dtype=w.dtype, device=w.device).copy_(w.transpose(1, 2))  # [B, S, N]
    st, zt = s.transpose(1, 2), z.transpose(1, 2)
    qt, et = torch.empty_like(wt), torch.empty_like(wt)
    for i in range(wt.shape[1]):
        x, si, zi = wt[:, i], st[:, i], zt[:, i]  # [B, N]
        torch.round(x / si, out=qt[:, i]).add_(zi).clamp_(0, maxq)  # primitives.quantize_codes' formula, one column
        torch.div(x - si * (qt[:, i] - zi), u[:, i, i, None], out=et[:, i])
        wt[:, i:] -= u[:, i, i:, None] * et[:, None, i]  # rank-1 update of the remaining columns, [B, S - i, N]
    return qt.transpose(1, 2), et.transpose(1, 2)


SEGMENT = 128  # columns solved by one solve_columns call at most (the fused kernel's register tile)


def segments(i1: int, i2: int, gs: int, natural: bool) -> list[tuple[int, int]]:
    """[a, b) column ranges of the lazy block [i1, i2): cut where a group starts (natural order: its
    scale and zero are computed there, from the columns as updated so far) and every SEGMENT columns."""
    cuts = {c for c in range(i1 + 1, i2) if (natural and c % gs == 0) or (c - i1) % SEGMENT == 0}
    cuts = [i1, *sorted(cuts), i2]
    return list(zip(cuts[:-1], cuts[1:]))


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
    H = h.detach().float().to(W.device).clone()  # [B, K, K]
    nb, n_rows, k = W.shape
    gs = scheme.group_size_for(k)
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
    groups = perm // gs  # [B, K] each visited column's group (no host sync inside the loop)

    codes = torch.zeros_like(W)  # [B, N, K] in visiting order
    losses = torch.zeros(nb, n_rows, device=W.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, :, i1:i2].clone()  # [B, N, Bs] this lazy block, updated segment by segment
        err1 = torch.zeros_like(W1)  # [B, N, Bs] scaled errors, for the lazy update of the columns after i2
        U1 = U[:, i1:i2, i1:i2]
        for a, b in segments(i1, i2, gs, natural=not act_order):
            sa, sb = a - i1, b - i1  # the segment inside the lazy block
            if not act_order and a % gs == 0:
                # entering a group: its current columns are W1[..., sa:] inside the block plus the columns
                # past i2 with this block's pending update (errors of columns i1..a-1) applied
                end = min(a + gs, k)
                current = W1[:, :, sa : end - i1]
                if end > i2:
                    pending = W[:, :, i2:end] - err1[:, :, :sa] @ U[:, i1:a, i2:end]
                    current = torch.cat([current, pending], dim=2)
                s, z = compute_qparams(current.reshape(nb * n_rows, -1), scheme)  # one (possibly partial) group
                scale[:, :, a // gs], zero[:, :, a // gs] = s.view(nb, n_rows), z.view(nb, n_rows)
            if act_order:  # each column's static group, [B, N, b - a]
                g = groups[:, None, a:b].expand(nb, n_rows, b - a)
                s_cols, z_cols = scale.gather(2, g), zero.gather(2, g)
            else:  # one group for the whole segment: broadcast (column stride 0)
                s_cols, z_cols = scale[:, :, a // gs, None].expand(nb, n_rows, b - a), zero[:, :, a // gs, None].expand(nb, n_rows, b - a)
            q, e = solve_columns(W1[:, :, sa:sb], U1[:, sa:sb, sa:sb], s_cols, z_cols, scheme.maxq)
            codes[:, :, a:b], err1[:, :, sa:sb] = q, e
            losses += e.pow(2).sum(-1) / 2
            if b < i2:  # the rest of this lazy block sees the segment's errors
                W1[:, :, sb:].baddbmm_(e, U1[:, sa:sb, sb:], alpha=-1)
        # the lazy batch update, W[:, :, i2:] -= err1 @ U[:, i1:i2, i2:], the subtraction in the GEMM's epilogue
        # (a separate `-=` was a fifth of down_proj's column loop on an H200: one more pass over the columns)
        W[:, :, i2:].baddbmm_(err1, U[:, i1:i2, i2:], alpha=-1)
    codes = codes.gather(2, torch.argsort(perm, dim=-1)[:, None, :].expand(nb, n_rows, k))  # back to natural column order
    results = [QuantResult(scheme, codes[b].to(torch.uint8), scale[b], zero[b].to(torch.uint8)) for b in range(nb)]
    return results, losses.sum(dim=1).tolist()


# ---------------------------------------------------------------- the block

DEAL_OUT_PER_PROCESS = 4  # solve batches per process above which they are dealt out whole (greedy by cost within ~1/4 of a batch)
SOLVE_BATCH = 32  # experts solved together: 32 x (W [N, K] + H, U [K, K]) fp32, ~1.3 GB at K = 2048, N = 1536


class _Stop(Exception):
    pass


@torch.no_grad()
def sequential_stages(ctx: BlockContext, shared: dict[str, str] | None = None) -> list[list[str]]:
    """The block's linears in forward order, consecutive ones reading the same input tensor grouped.

    Found by running the block once on one sample with hooks; linears the forward never calls come last.
    shared: filled with linear -> the first linear that read the very same input tensor (q/k/v, gate/up,
    and with every token through every expert all experts' gate/up): one Hessian serves them all.
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
    if shared is not None:
        for i, (name, x) in enumerate(calls):
            shared[name] = next(n for n, y in calls[: i + 1] if y is x)
    stages: list[list[str]] = []
    for i, (name, x) in enumerate(calls):
        if i and x is calls[i - 1][1]:
            stages[-1].append(name)
        else:
            stages.append([name])
    called = {n for n, _ in calls}
    stages += [[n] for n in ctx.linears if n not in called]
    return merge_experts(stages)


def merge_experts(stages: list[list[str]]) -> list[list[str]]:
    """Stages of experts' linears merged by role: the experts of a block read different token sets, so each
    expert would be its own stage (a pass over the samples each: hundreds per block); they do not feed
    each other, so all experts' gate/up form one stage and all their downs the next. Dense blocks: unchanged."""
    merged: list[list[str]] = []
    stage_of: dict[str, int] = {}
    for stage in stages:
        target = next((stage_of[expert_role(n)] for n in stage if expert_role(n) in stage_of), None)
        if target is None:
            merged.append([])
            target = len(merged) - 1
        for n in stage:
            stage_of.setdefault(expert_role(n), target)
            merged[target].append(n)
    return merged


@torch.no_grad()
def stage_hessians(ctx: BlockContext, names: list[str], shared: dict[str, str] | None = None) -> dict[str, tuple[torch.Tensor | None, int]]:
    """H and row count per linear over all cached inputs; each forward stops after the stage's last linear.

    shared (sequential_stages): a linear that reads the same tensor as an earlier one of the stage takes its
    Hessian (computed and reduced once). Each H is accumulated on its linear's own device (a block placed
    over several devices)."""
    shared = shared or {}
    source = {n: shared.get(n, n) if shared.get(n, n) in names else n for n in names}
    hooked = [n for n in names if source[n] == n]
    acc: dict[str, tuple[torch.Tensor | None, int]] = {n: (None, 0) for n in hooked}
    pending = set()

    def hook(name):
        device = ctx.linears[name].weight.device
        weight = row_weight(ctx.block, name)  # an expert's routed rows, while every token runs through every expert

        def fn(module, args):
            acc[name] = accumulate_hessian(*acc[name], args[0].to(device), weight())
            pending.discard(name)
            if not pending:
                raise _Stop

        return fn

    handles = [ctx.linears[n].register_forward_pre_hook(hook(n)) for n in hooked]
    try:
        for indices in ctx.batches():
            pending.update(hooked)
            try:
                ctx.forward(indices)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    reduced = reduce_hessians(ctx, acc)
    return {name: reduced[source[name]] for name in names}


def reduce_hessians(ctx: BlockContext, acc: dict[str, tuple[torch.Tensor | None, float]]) -> dict[str, tuple[torch.Tensor | None, float]]:
    """Each linear's mean Hessian over every process's rows, sum_p n_p H_p / sum_p n_p (one process: unchanged).

    All of a stage's linears at once: their row counts in one reduction (float64: exact past 2^24; the one host
    sync), then every n_p H_p reduced asynchronously and waited for together. A MoE stage has 128 experts:
    a count and a Hessian reduction per expert, each waited for by the host, were ~0.35 s per Qwen3-30B-A3B
    block on two H200s. A linear no process called keeps H None. H is scaled in place (the local sums are not
    used again)."""
    if ctx.world_size == 1:
        return acc
    names, where = list(acc), torch.device(getattr(ctx.engine.reducer, "device", ctx.device))  # where collectives run
    totals = ctx.reduce_sum(torch.tensor([float(acc[n][1]) for n in names], dtype=torch.float64, device=where)).tolist()
    pending, out = [], {}
    for name, total in zip(names, totals):
        h, n = acc[name]
        if total == 0:
            out[name] = (None, 0.0)
            continue
        linear = ctx.linears[name]
        weighted = h.mul_(n) if h is not None else torch.zeros(linear.in_features, linear.in_features, device=linear.weight.device)
        if weighted.device != where:  # a linear placed on another device: reduced where the reducer works
            out[name] = (ctx.reduce_sum(weighted).div_(total), total)
            continue
        pending.append((name, weighted, total, ctx.engine.start("all_reduce", weighted)))
    for name, weighted, total, work in pending:
        work.wait()
        out[name] = (weighted.div_(total), total)
    return out


def solve_groups(ctx: BlockContext, names: list[str], hessians: dict) -> list[list[str]]:
    """The stage's linears in solve batches: the experts of one module that play one role (same shape and
    scheme) are solved together as a batch (gptq_quantize_many), at most SOLVE_BATCH at a time; other linears
    that share one Hessian (they read one input: q/k/v, gate/up) with the same scheme and device form one
    group whose rows are stacked (`joins_rows`); every other linear alone."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        h = hessians[name][0]
        if h is None:
            continue
        linear = ctx.linears[name]
        if expert_role(name) != name:  # same role, shape, scheme and device (a block spread over several devices places experts apart)
            key = (expert_role(name), linear.out_features, linear.in_features, ctx.schemes[name], linear.weight.device)
        else:  # stage_hessians hands linears reading one input the very same H tensor
            key = ("rows", id(h), ctx.schemes[name], linear.weight.device)
        groups.setdefault(key, []).append(name)
    return [g[i : i + SOLVE_BATCH] for g in groups.values() for i in range(0, len(g), SOLVE_BATCH)]


def solve_cost(linears: list[torch.nn.Linear], joined: bool) -> int:
    """~ the solve's work: per solved weight K x (K + N) (the factorisation of H, then the column loop over N rows)."""
    k = linears[0].in_features
    return k * (k + sum(l.out_features for l in linears)) if joined else len(linears) * k * (k + linears[0].out_features)


def joins_rows(group: list[str]) -> bool:
    """A solve_groups group of linears that share H, solved as one weight of their stacked rows: GPTQ treats
    every row of W alone given H (its scale / zero groups run along K), so stacking q/k/v's rows gives each row
    the codes it gets alone, with one factorisation of H and one column loop instead of one per linear."""
    return len(group) > 1 and expert_role(group[0]) == group[0]


def quantize_block(ctx: BlockContext, config: GptqConfig | None = None) -> dict[str, QuantResult]:
    config = config or GptqConfig()
    if not ctx.linears or not ctx.calibrated:
        return {n: quantize_weight(l.weight.data, ctx.schemes[n], bias=l.bias) for n, l in ctx.linears.items()}
    started = time.time()
    ctx.block.eval()
    shared: dict[str, str] = {}
    with ctx.phase("stats"):
        stages = sequential_stages(ctx, shared)
    if not config.true_sequential:
        stages = [list(ctx.linears)]
    results, total = {}, 0.0
    for names in stages:
        with ctx.phase("stats"):
            hessians = stage_hessians(ctx, names, shared)
        for name in names:
            if hessians[name][0] is None:  # never called: nothing to be faithful to
                linear = ctx.linears[name]
                results[name] = quantize_weight(linear.weight.data, ctx.schemes[name], bias=linear.bias)
        groups = solve_groups(ctx, names, hessians)
        # the solve (the loop over K columns) does not shrink with the samples: data-parallel processes split
        # it. Many batches (a MoE stage): dealt out whole by cost; few (a dense stage: q/k/v, o, gate/up,
        # down): every process solves its share of each linear's rows (rows are independent given H), so no
        # process waits while another solves down_proj alone.
        whole = len(groups) >= DEAL_OUT_PER_PROCESS * ctx.world_size
        solver = ctx.owners([tuple(g) for g in groups], cost=lambda g: solve_cost([ctx.linears[n] for n in g], joins_rows(list(g)))) if whole else {}
        for group in groups:
            owner = solver.get(tuple(group))
            linears = [ctx.linears[n] for n in group]
            joined = joins_rows(group)
            n_rows = sum(l.out_features for l in linears) if joined else linears[0].out_features  # rows of one solved weight
            rows = slice(None) if whole else ctx.row_share(n_rows)
            mine, losses = [None] * (1 if joined else len(group)), [0.0] * (1 if joined else len(group))
            with ctx.phase("solve"):
                if not whole or owner == ctx.engine.rank:
                    w = torch.cat([l.weight for l in linears])[None, rows] if joined else torch.stack([l.weight[rows] for l in linears])  # [B, rows, K]
                    h = torch.stack([hessians[n][0] for n in group[: len(w)]])  # [B, K, K]
                    mine, losses = gptq_quantize_many(w, h, ctx.schemes[group[0]], config.block_size, config.damp_percent, config.act_order)
                solved_linears = linears[:1] if joined else linears  # one stacked weight, or each linear
                if whole:
                    solved, losses = ctx.shared_results(owner, mine if owner == ctx.engine.rank else None, losses, solved_linears, rows=n_rows)
                else:
                    solved, losses = ctx.joined_rows(mine, losses, solved_linears, rows=n_rows)
                total += sum(losses)
                if joined:  # the stacked rows back to their linears, in order
                    cuts = torch.tensor([0] + [l.out_features for l in linears]).cumsum(0).tolist()
                    solved = [QuantResult(solved[0].scheme, *(getattr(solved[0], f)[a:b] for f in ("codes", "scale", "zero"))) for a, b in zip(cuts, cuts[1:])]
                for name, linear, result in zip(group, linears, solved):
                    result.bias = None if linear.bias is None else linear.bias.detach().clone()
                    results[name] = result
                    # later stages must see this linear quantized (their inputs are recomputed through it)
                    linear.weight.data = result.dequantize().to(linear.weight)
    if ctx.log:
        ctx.log(f"block {ctx.index}: gptq {len(stages)} stages, error {total:.4g}, {time.time() - started:.1f}s")
    return results


register_algorithm(GptqConfig, quantize_block)
