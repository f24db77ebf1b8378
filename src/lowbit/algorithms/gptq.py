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


def solve_columns(w: torch.Tensor, u: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round B columns one after another, each column's error spread over the columns after it.

    w [N, B] the columns (not modified), u [B, B] the upper Cholesky factor of H^-1 restricted to them,
    s / z [N, B] each column's scale and zero. Returns (codes q [N, B], scaled errors e [N, B]), float32:
    q_i = clamp(round(x_i / s_i) + z_i), e_i = (x_i - s_i (q_i - z_i)) / u_ii, then W[:, j >= i] -= e_i u_ij.
    On CUDA one fused Triton launch (kernels/triton/gptq.py: the loop is launch-bound there); this loop is
    its reference and the CPU path."""
    if w.is_cuda:
        from ..kernels.triton.gptq import gptq_columns

        return gptq_columns(w, u, s, z, maxq)
    wt = torch.empty(w.shape[1], w.shape[0], dtype=w.dtype, device=w.device).copy_(w.t())  # [B, N]: column i is row i
    st, zt = s.t(), z.t()
    qt, et = torch.empty_like(wt), torch.empty_like(wt)
    for i in range(wt.shape[0]):
        x, si, zi = wt[i], st[i], zt[i]
        torch.round(x / si, out=qt[i]).add_(zi).clamp_(0, maxq)  # primitives.quantize_codes' formula, one column
        torch.div(x - si * (qt[i] - zi), u[i, i], out=et[i])
        wt[i:].addr_(u[i, i:], et[i], alpha=-1)  # rank-1 update of the remaining columns
    return qt.t(), et.t()


SEGMENT = 128  # columns solved by one solve_columns call at most (the fused kernel's register tile)


def segments(i1: int, i2: int, gs: int, natural: bool) -> list[tuple[int, int]]:
    """[a, b) column ranges of the lazy block [i1, i2): cut where a group starts (natural order: its
    scale and zero are computed there, from the columns as updated so far) and every SEGMENT columns."""
    cuts = {c for c in range(i1 + 1, i2) if (natural and c % gs == 0) or (c - i1) % SEGMENT == 0}
    cuts = [i1, *sorted(cuts), i2]
    return list(zip(cuts[:-1], cuts[1:]))


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
    W = w.detach().float().clone()  # [N, K], updated in place as errors are spread
    H = h.detach().float().to(W.device).clone()
    n_rows, k = W.shape
    gs = scheme.group_size_for(k)
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    scale = torch.zeros(n_rows, scheme.groups(k), device=W.device)  # [N, G]
    zero = torch.zeros_like(scale)
    perm = torch.arange(k, device=W.device)
    if act_order:  # static groups on the original weight, then visit columns by decreasing H_jj
        scale, zero = compute_qparams(W, scheme)
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    group_of = perm // gs  # [K] the group of each visited column (no host sync inside the loop)
    U = inverse_hessian_factor(H, damp_percent)  # [K, K] upper

    codes = torch.zeros_like(W)  # [N, K] in visiting order
    errors = torch.zeros_like(W)  # [N, K] scaled errors, for the loss
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()  # [N, B] this lazy block, updated segment by segment
        err1 = errors[:, i1:i2]  # [N, B] view: the lazy update of the columns after i2 reads it
        U1 = U[i1:i2, i1:i2]
        for a, b in segments(i1, i2, gs, natural=not act_order):
            if not act_order and a % gs == 0:
                # entering a group: its current columns are W1[:, a:] inside the block plus the columns
                # past i2 with this block's pending update (errors of columns i1..a-1) applied
                end = min(a + gs, k)
                current = W1[:, a - i1 : end - i1]
                if end > i2:
                    pending = W[:, i2:end] - err1[:, : a - i1] @ U[i1:a, i2:end]
                    current = torch.cat([current, pending], dim=1)
                s, z = compute_qparams(current, scheme)  # [N, 1]: one (possibly partial) group
                scale[:, a // gs], zero[:, a // gs] = s[:, 0], z[:, 0]
            if act_order:  # each column's static group, [N, b - a]
                s_cols, z_cols = scale[:, group_of[a:b]], zero[:, group_of[a:b]]
            else:  # one group for the whole segment: broadcast (column stride 0)
                s_cols, z_cols = scale[:, a // gs, None].expand(-1, b - a), zero[:, a // gs, None].expand(-1, b - a)
            q, e = solve_columns(W1[:, a - i1 : b - i1], U1[a - i1 : b - i1, a - i1 : b - i1], s_cols, z_cols, scheme.maxq)
            codes[:, a:b], err1[:, a - i1 : b - i1] = q, e
            if b < i2:  # the rest of this lazy block sees the segment's errors
                W1[:, b - i1 :] -= e @ U1[a - i1 : b - i1, b - i1 :]
        W[:, i2:] -= err1 @ U[i1:i2, i2:]  # the lazy batch update
    codes = codes[:, torch.argsort(perm)]  # back to natural column order
    result = QuantResult(scheme, codes.to(torch.uint8), scale, zero.to(torch.uint8))
    return result, (errors.pow(2).sum() / 2).item()


# ---------------------------------------------------------------- the block


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
    return stages


@torch.no_grad()
def stage_hessians(ctx: BlockContext, names: list[str], shared_input: bool = False) -> dict[str, tuple[torch.Tensor | None, int]]:
    """H and row count per linear over all cached inputs; each forward stops after the stage's last linear.

    shared_input: the stage's linears read one tensor (a true-sequential stage: q/k/v, gate/up), so one
    Hessian serves them all (computed and reduced once, not once per linear). Each H is accumulated on its
    linear's own device (a block placed over several devices)."""
    hooked = names[:1] if shared_input else names
    acc: dict[str, tuple[torch.Tensor | None, int]] = {n: (None, 0) for n in hooked}
    pending = set()

    def hook(name):
        device = ctx.linears[name].weight.device

        def fn(module, args):
            acc[name] = accumulate_hessian(*acc[name], args[0].to(device))
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
    reduced = {name: reduce_hessian(ctx, ctx.linears[name], h, n) for name, (h, n) in acc.items()}
    return {name: reduced[hooked[0]] if shared_input else reduced[name] for name in names}


def reduce_hessian(ctx: BlockContext, linear: torch.nn.Linear, h: torch.Tensor | None, n: int) -> tuple[torch.Tensor | None, int]:
    """The mean Hessian over every process's rows: sum_p n_p H_p / sum_p n_p (one process: unchanged)."""
    if ctx.world_size == 1:
        return h, n
    device, k = linear.weight.device, linear.in_features
    total = ctx.reduce_sum(torch.tensor(float(n), dtype=torch.float64, device=device))  # rows: exact past 2^24
    weighted = ctx.reduce_sum(h * n if h is not None else torch.zeros(k, k, device=device))
    return (weighted / total if total > 0 else None), int(total.item())


def quantize_block(ctx: BlockContext, config: GptqConfig | None = None) -> dict[str, QuantResult]:
    config = config or GptqConfig()
    if not ctx.linears or not ctx.calibrated:
        return {n: quantize_weight(l.weight.data, ctx.schemes[n], bias=l.bias) for n, l in ctx.linears.items()}
    started = time.time()
    ctx.block.eval()
    stages = sequential_stages(ctx) if config.true_sequential else [list(ctx.linears)]
    results, total = {}, 0.0
    for names in stages:
        hessians = stage_hessians(ctx, names, shared_input=config.true_sequential)
        # the solve (the loop over K columns) does not shrink with the samples: processes split the linears
        solver = ctx.owners(names, cost=lambda n: ctx.linears[n].in_features * (ctx.linears[n].in_features + ctx.linears[n].out_features))
        for name in names:
            linear, (h, n) = ctx.linears[name], hessians[name]
            if h is None:  # never called: nothing to be faithful to
                results[name] = quantize_weight(linear.weight.data, ctx.schemes[name], bias=linear.bias)
                continue
            result, loss = None, 0.0
            if solver[name] == ctx.engine.rank:
                result, loss = gptq_quantize(linear.weight, h, ctx.schemes[name], config.block_size, config.damp_percent, config.act_order)
            result, loss = ctx.shared_result(solver[name], result, loss, linear)
            result.bias = None if linear.bias is None else linear.bias.detach().clone()
            results[name], total = result, total + loss
            # later stages must see this linear quantized (their inputs are recomputed through it)
            linear.weight.data = result.dequantize().to(linear.weight)
    if ctx.log:
        ctx.log(f"block {ctx.index}: gptq {len(stages)} stages, error {total:.4g}, {time.time() - started:.1f}s")
    return results


register_algorithm(GptqConfig, quantize_block)
