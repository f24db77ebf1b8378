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
    return {name: acc[source[name]] for name in names}  # linears sharing an input share one entry (one object)


def count_rows(ctx: BlockContext, hessians: dict) -> dict[str, tuple[torch.Tensor | None, float]]:
    """Every process's row counts summed per Hessian in one reduction (float64: exact past 2^24; the one host sync
    of the reduction), each entry then (n_p H_p, total rows): the local part of the sum, reduced by
    `reduce_hessians` once the stage knows who solves what. No process called the linear: (None, 0); this one did
    not but another did: a zero part. Entries shared by linears reading one input stay shared. One process:
    unchanged (H is already the mean)."""
    if ctx.world_size == 1:
        return hessians
    entries = {id(e): e for e in hessians.values()}  # one per distinct Hessian, in the stage's order
    where = torch.device(getattr(ctx.engine.reducer, "device", ctx.device))  # where collectives run
    totals = ctx.reduce_sum(torch.tensor([float(e[1]) for e in entries.values()], dtype=torch.float64, device=where)).tolist()
    first = {}  # entry -> the first linear holding it (its shape and device)
    for name, e in hessians.items():
        first.setdefault(id(e), name)
    counted = {}
    for (key, (h, n)), total in zip(entries.items(), totals):
        name = first[key]
        k = ctx.linears[name].in_features
        counted[key] = (None, 0.0) if total == 0 else (h.mul_(n) if h is not None else torch.zeros(k, k, device=ctx.linears[name].weight.device), total)
    return {name: counted[id(e)] for name, e in hessians.items()}


def reduce_hessians(ctx: BlockContext, counted: dict, owner_of: dict[str, int]) -> dict[str, tuple[torch.Tensor | None, float]]:
    """The mean Hessians sum_p n_p H_p / sum_p n_p from `count_rows`' parts: onto the one process that solves with
    it (owner_of gives a linear's solver when solves are dealt out whole: half an all-reduce's traffic), else on
    every process; launched asynchronously and waited for together (a MoE stage's 128 experts: one wait, not a
    count, a Hessian and a host sync per expert). Elsewhere than its solver an entry holds a partial sum: it is
    not read there. One process: unchanged."""
    if ctx.world_size == 1:
        return counted
    where = torch.device(getattr(ctx.engine.reducer, "device", ctx.device))
    solvers: dict[int, set] = {}
    for name, entry in counted.items():
        solvers.setdefault(id(entry), set()).add(owner_of.get(name))
    pending, done = [], set()
    for entry in counted.values():
        weighted, total = entry
        if weighted is None or id(entry) in done:
            continue
        done.add(id(entry))
        owners = solvers[id(entry)]
        owner = next(iter(owners)) if len(owners) == 1 else None  # None: every process solves with it
        if weighted.device != where:  # a linear placed on another device: reduced where the reducer works
            weighted.copy_(ctx.reduce_sum(weighted))
            weighted.div_(total)
            continue
        pending.append((weighted, total, ctx.engine.start("all_reduce" if owner is None else "reduce", weighted, owner)))
    for weighted, total, work in pending:
        work.wait()
        weighted.div_(total)
    return counted


Unit = tuple  # linear names sharing one Hessian, solved as one weight of their stacked rows


def solve_groups(ctx: BlockContext, names: list[str], hessians: dict) -> list[list[Unit]]:
    """The stage's linears in solve batches of units. A unit is the linears that share one Hessian (they read one
    input: q/k/v, gate/up, and an expert's own gate/up) and have the same scheme and device: solved as one weight
    of their stacked rows (`gptq_quantize_many` on [B, rows, K]); GPTQ treats each row alone given H, so each
    linear gets the codes it gets alone, with one factorisation of H and one column loop instead of one per
    linear. The units of one experts module that play one role (same shapes and scheme) form batches of at most
    SOLVE_BATCH (smaller with several processes, to be dealt out whole); every other unit is its own batch."""
    units: dict[tuple, list[str]] = {}
    for name in names:
        h = hessians[name][0]
        if h is None:
            continue
        linear = ctx.linears[name]
        prefix = name.rpartition(".")[0] if expert_role(name) != name else ""  # an expert's linears share only with each other
        units.setdefault((id(h), prefix, ctx.schemes[name], linear.weight.device), []).append(name)
    groups: dict[tuple, list[Unit]] = {}
    for (_, prefix, scheme, device), members in units.items():
        unit = tuple(members)
        if prefix:  # experts: batched by their roles and shapes
            shapes = tuple((ctx.linears[n].out_features, ctx.linears[n].in_features) for n in unit)
            key = ("experts", tuple(expert_role(n) for n in unit), shapes, scheme, device)
        else:
            key = ("alone", unit)
        groups.setdefault(key, []).append(unit)
    out = []
    for key, g in groups.items():
        # several processes: batches small enough that there are DEAL_OUT_PER_PROCESS per process to deal out
        # whole (128 experts, two processes: 8 batches of 16), so each process factors only its experts' Hessians
        size = SOLVE_BATCH
        if key[0] == "experts" and ctx.world_size > 1:
            size = min(SOLVE_BATCH, max(1, -(-len(g) // (DEAL_OUT_PER_PROCESS * ctx.world_size))))
        out += [g[i : i + size] for i in range(0, len(g), size)]
    return out


def unit_rows(ctx: BlockContext, unit: Unit) -> int:
    return sum(ctx.linears[n].out_features for n in unit)


def solve_cost(ctx: BlockContext, group: list[Unit]) -> int:
    """~ the solve's work: per unit K x (K + rows) (the factorisation of H, then the column loop over its rows)."""
    k = ctx.linears[group[0][0]].in_features
    return len(group) * k * (k + unit_rows(ctx, group[0]))


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
            hessians = count_rows(ctx, stage_hessians(ctx, names, shared))
        for name in names:
            if hessians[name][0] is None:  # never called: nothing to be faithful to
                linear = ctx.linears[name]
                results[name] = quantize_weight(linear.weight.data, ctx.schemes[name], bias=linear.bias)
        groups = solve_groups(ctx, names, hessians)
        # the solve (the loop over K columns) does not shrink with the samples: data-parallel processes split
        # it. Many batches (a MoE stage): dealt out whole by cost, each Hessian reduced onto its solver. Dense
        # units (q/k/v, o, gate/up, down), at least one per process (a block in one stage, not true-sequential):
        # dealt out whole too, since a unit's column loop is latency-bound and takes as long on half of its rows
        # as on all (an H200: down_proj 0.140 / 0.137 s, stop 23), so splitting rows would leave every process the
        # sum of all four loops. Fewer (a true-sequential stage: one unit): every process solves its share of the
        # unit's rows (rows are independent given H).
        dense = all(expert_role(unit[0]) == unit[0] for g in groups for unit in g)
        whole = len(groups) >= DEAL_OUT_PER_PROCESS * ctx.world_size or (dense and 1 < ctx.world_size <= len(groups))
        solver = ctx.owners([tuple(g) for g in groups], cost=lambda g: solve_cost(ctx, list(g))) if whole else {}
        with ctx.phase("stats"):
            hessians = reduce_hessians(ctx, hessians, {n: solver[tuple(g)] for g in groups for unit in g for n in unit} if whole else {})
        for group in groups:
            owner = solver.get(tuple(group))
            n_rows = unit_rows(ctx, group[0])  # rows of one solved weight (a unit's linears stacked)
            rows = slice(None) if whole else ctx.row_share(n_rows)
            mine, losses = [None] * len(group), [0.0] * len(group)
            firsts = [ctx.linears[unit[0]] for unit in group]  # each solved weight's scheme and device
            with ctx.phase("solve"):
                if not whole or owner == ctx.engine.rank:
                    w = torch.stack([torch.cat([ctx.linears[n].weight for n in unit])[rows] for unit in group])  # [B, rows, K]
                    h = torch.stack([hessians[unit[0]][0] for unit in group])  # [B, K, K]
                    mine, losses = gptq_quantize_many(w, h, ctx.schemes[group[0][0]], config.block_size, config.damp_percent, config.act_order)
                if whole:
                    solved, losses = ctx.shared_results(owner, mine if owner == ctx.engine.rank else None, losses, firsts, rows=n_rows)
                else:
                    solved, losses = ctx.joined_rows(mine, losses, firsts, rows=n_rows)
                total += sum(losses)
                for unit, stacked in zip(group, solved):  # the stacked rows back to their linears, in order
                    cuts = [0, *torch.tensor([ctx.linears[n].out_features for n in unit]).cumsum(0).tolist()]
                    for name, a, b in zip(unit, cuts, cuts[1:]):
                        linear = ctx.linears[name]
                        result = QuantResult(stacked.scheme, *(getattr(stacked, f)[a:b] for f in ("codes", "scale", "zero")))
                        result.bias = None if linear.bias is None else linear.bias.detach().clone()
                        results[name] = result
                        # later stages must see this linear quantized (their inputs are recomputed through it)
                        linear.weight.data = result.dequantize().to(linear.weight)
    if ctx.log:
        ctx.log(f"block {ctx.index}: gptq {len(stages)} stages, error {total:.4g}, {time.time() - started:.1f}s")
    return results


register_algorithm(GptqConfig, quantize_block)
