"""AutoRound / SignRound (Cheng et al., arXiv 2309.05516) on one block.

For every linear of the block, learn
- V [N, K] in [-0.5, 0.5]: an offset added before rounding, q = round(W / s + V) + z, init 0 (= RTN);
- per-group factors on the group's range, min_scale / max_scale [N, G] in [0, 1], init 1 (= RTN),
by signed gradient descent (p -= lr_t * sign(grad), lr_t decaying linearly from lr to 0) on the MSE
between the block's output with fake-quantized weights and its full-precision output on the cached
calibration inputs. The parameters of the lowest loss seen are kept, and the codes come from
`quantize_weight`, the same grid RTN uses, so the exported codes are exactly the trained ones.

Speed: the fake quantization of a weight is one autograd node with a hand-written backward
(`fq_forward` / `fq_backward` / `qparam_backward`, pure functions on [N, G, gs] group views), instead of the ~20 generic
nodes autograd would record through `primitives.fake_quantize`: fewer passes over the weights and
fewer saved tensors. The group view, its min/max and the padding are computed once per block, not
once per step. A unit test checks the gradients against autograd through `primitives.fake_quantize`.

The block is never changed permanently: its linears are swapped for fake-quant wrappers in their
parent modules during training and put back in a `finally`; `requires_grad` flags are restored.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..arch import expert_parallel
from ..arch.experts import expert_role, experts_modules
from ..config import AutoRoundConfig, Scheme
from ..quant import QuantResult, quantize_weight
from ..quant.primitives import SCALE_FLOOR, group_view
from . import register_algorithm
from .base import BlockContext

V_BOUND = 0.5  # |V| <= 0.5: a weight moves at most to the neighbouring grid point
MINMAX_BOUNDS = (0.0, 1.0)  # the factors only shrink a group's range (auto-round clamps to [0, 1])


# ---------------------------------------------------------------- the grid, forward and backward


def group_qparams(lo, hi, min_scale, max_scale, maxq: int, sym: bool):
    """Scale and zero of each group; all [N, G, 1] float32.

    lo / hi: the group's min clamped to <= 0 and max clamped to >= 0 (constants).
    Returns (s, z, a, b, s_raw): a = lo * min_scale, b = hi * max_scale the tuned range ends, s_raw the
    scale before the floor clamp and the fp16 rounding (export formats store fp16 scales).
    """
    a, b = lo * min_scale, hi * max_scale
    if sym:
        s_raw = 2 * torch.maximum(-a, b) / maxq
    else:
        s_raw = (b - a) / maxq
    s = s_raw.clamp(min=SCALE_FLOOR).half().float()
    if sym:
        z = torch.full_like(s, float((maxq + 1) // 2))
    else:
        z = (-a / s).round().clamp(0, maxq)
    return s, z, a, b, s_raw


def fq_forward(x, v, s, z, maxq: int, out_dtype: torch.dtype):
    """Fake-quantize one weight in its group view, elementwise part (the one worth compiling).

    x, v: [N, G, gs] float32; s, z: [N, G, 1] from group_qparams.
    Returns (w_hat [N, G, gs] in out_dtype, q - z as fp16 (small integers: exact), inside: bool mask of
    the codes the clamp left alone).
    """
    c = (x / s).add_(v).round_().add_(z)  # codes before the clamp, [N, G, gs]
    inside = (c >= 0) & (c <= maxq)  # where d q / d c = 1 (clamp's gradient)
    qz = c.clamp_(0, maxq).sub_(z)
    return (qz * s).to(out_dtype), qz.to(torch.float16), inside


def fq_backward(g, x, s, qz, inside):
    """Elementwise part of the backward: (dL/dv [N, G, gs], dL/ds holding z [N, G, 1], sum_gs g (1 - inside)).

    With u = x / s + v, c = round(u) + z, q = clamp(c), w = s (q - z) and straight-through rounding:
      dL/dv = g s [c inside]
      dL/ds = sum_gs g ((q - z) - [c inside] x / s)      (u depends on s through x / s)
      dL/dz = -s sum_gs g (1 - [c inside])               (the caller multiplies by -s)
    """
    g = g.float()
    dv = g * s * inside
    ds = (g * (qz.float() - inside * (x / s))).sum(-1, keepdim=True)
    outside = (g * (~inside)).sum(-1, keepdim=True)
    return dv, ds, outside


def qparam_backward(ds, outside, lo, hi, s, a, b, s_raw, maxq: int, sym: bool):
    """Chain dL/ds (and dL/dz = -s * outside) back to min_scale / max_scale; all [N, G, 1].

    z = clamp(round(-a / s)) (asym), s = clamp(s_raw, floor), s_raw = (b - a) / maxq (asym) or
    2 max(-a, b) / maxq (sym; ties split the gradient in half as torch.maximum does),
    a = lo * min_scale, b = hi * max_scale.
    """
    if sym:
        ds = ds * (s_raw >= SCALE_FLOOR)
        dabs = ds * (2.0 / maxq)
        na = -a
        half = torch.where(na == b, dabs / 2, torch.zeros_like(dabs))
        da = -torch.where(na > b, dabs, half)
        db = torch.where(b > na, dabs, half)
    else:
        zr = (-a / s).round()
        dz_raw = -s * outside * ((zr >= 0) & (zr <= maxq))
        ds = (ds + dz_raw * a / (s * s)) * (s_raw >= SCALE_FLOOR)  # z_raw = -a / s
        da = -ds / maxq - dz_raw / s
        db = ds / maxq
    return da * lo, db * hi


class FakeQuant(torch.autograd.Function):
    """One autograd node for the grid. The per-group scale / zero math runs eagerly (tiny, and it must
    round the scale to fp16 exactly as quantize_weight does); fns = (fq_forward, fq_backward), possibly
    compiled, does the elementwise work over the weight."""

    @staticmethod
    def forward(ctx, x, lo, hi, v, min_scale, max_scale, maxq, sym, out_dtype, fns):
        s, z, a, b, s_raw = group_qparams(lo, hi, min_scale, max_scale, maxq, sym)
        w_hat, qz, inside = fns[0](x, v, s, z, maxq, out_dtype)
        ctx.save_for_backward(x, lo, hi, qz, inside, s, a, b, s_raw)
        ctx.maxq, ctx.sym, ctx.fns = maxq, sym, fns
        return w_hat

    @staticmethod
    def backward(ctx, g):
        x, lo, hi, qz, inside, s, a, b, s_raw = ctx.saved_tensors
        dv, ds, outside = ctx.fns[1](g, x, s, qz, inside)
        dmin, dmax = qparam_backward(ds, outside, lo, hi, s, a, b, s_raw, ctx.maxq, ctx.sym)
        return None, None, None, dv, dmin, dmax, None, None, None, None


# ---------------------------------------------------------------- per-linear trainable state


@dataclass
class LinearState:
    """What is learned for B same-shaped linears of one scheme (the experts of one role in a MoE block, or one
    linear), plus their constant group view; the grid runs once over all B (a few ops per step for a role's
    128 experts, not a few per expert: a MoE block's step was bound by the host issuing them).

    x: [B, N, G, gs] float32 weights, each partial last group zero-padded; lo / hi: [B, N, G, 1];
    v: [B, N, G, gs]; min_scale / max_scale: [B, N, G, 1]; k: the real in_features. Every op of the grid is
    elementwise or reduces over the last axis, so each linear's values are what it would get alone.
    """

    scheme: Scheme
    x: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    v: torch.Tensor
    min_scale: torch.Tensor
    max_scale: torch.Tensor
    k: int

    @classmethod
    def from_weights(cls, ws: list[torch.Tensor], scheme: Scheme, tune_minmax: bool) -> "LinearState":
        first = group_view(ws[0].detach().float(), scheme.group_size)  # [N, G, gs]
        x = torch.empty((len(ws), *first.shape), dtype=torch.float32, device=first.device)  # [B, N, G, gs]
        x[0] = first
        for i, w in enumerate(ws[1:], 1):  # filled one by one: one linear's float copy at a time beside x
            x[i] = group_view(w.detach().float(), scheme.group_size)
        lo = x.amin(-1, keepdim=True).clamp(max=0)
        hi = x.amax(-1, keepdim=True).clamp(min=0)
        ones = torch.ones_like(lo)
        return cls(
            scheme=scheme, x=x, lo=lo, hi=hi,
            v=torch.zeros_like(x, requires_grad=True),
            min_scale=ones.clone().requires_grad_(tune_minmax),
            max_scale=ones.clone().requires_grad_(tune_minmax),
            k=ws[0].shape[1],
        )

    def params(self) -> list[torch.Tensor]:
        return [p for p in (self.v, self.min_scale, self.max_scale) if p.requires_grad]

    def weight_hat(self, out_dtype: torch.dtype, fns) -> torch.Tensor:
        """Fake-quantized weights [B, N, K] in out_dtype, differentiable in the learned parameters."""
        b, n = self.x.shape[:2]
        w = FakeQuant.apply(self.x, self.lo, self.hi, self.v, self.min_scale, self.max_scale, self.scheme.maxq, self.scheme.sym, out_dtype, fns)
        return w.reshape(b, n, -1)[:, :, : self.k]  # [B, N, G*gs] -> [B, N, K]

    def export(self, i: int, v: torch.Tensor, min_scale: torch.Tensor, max_scale: torch.Tensor):
        """Linear i's group-view parameters -> (v [N, K], min_scale [N, G], max_scale [N, G]) for quantize_weight."""
        n = self.x.shape[1]
        return v[i].reshape(n, -1)[:, : self.k], min_scale[i].squeeze(-1), max_scale[i].squeeze(-1)


class ModuleWait:
    """A forward pre-hook of a module holding trained linears (compiled data-parallel blocks): waits for their
    W_hat buffers' broadcasts. Outside the graph (torch.compiler.disable): a graph break per module, and the
    next block's hooks compile nothing new (tested). Disabled once, on first use, not at import, which would
    import dynamo with lowbit (~2.3 s: tests/unit/test_startup_imports.py)."""

    outside_graph = None  # torch.compiler.disable(ModuleWait.wait), made once

    def __init__(self, trainer: "Trainer", keys: list):
        self.trainer, self.keys = trainer, keys
        if ModuleWait.outside_graph is None:
            ModuleWait.outside_graph = torch.compiler.disable(ModuleWait.wait)

    @staticmethod
    def wait(trainer: "Trainer", keys: list) -> None:
        trainer.wait_for(keys)

    def __call__(self, module, args):
        ModuleWait.outside_graph(self.trainer, self.keys)


class FakeQuantLinear(torch.nn.Module):
    """Stands in for an nn.Linear during training: y = x W_hat^T + b, W_hat [N, K] a leaf tensor refreshed
    before every step (`Trainer.refresh`); its gradient is carried through the grid afterwards
    (`Trainer.through_grid`). The same leaf every step, so a compiled block sees one input, not a new constant.
    ready: None, or (eager data-parallel training) a callable waiting for this W_hat's broadcast, called
    right before the matmul, so the first linears compute while the later ones' W_hat still arrive.
    stack: None, or (S [B, N, K], i): the W_hat of this linear's whole buffer as one leaf over the same memory,
    and this linear's place in it (S[i] is weight_hat's memory), for the grouped experts (`stacked`)."""

    def __init__(self, linear: torch.nn.Linear, weight_hat: torch.Tensor, ready=None, stack=None):
        super().__init__()
        self.bias = linear.bias
        self.weight_hat = weight_hat
        self.ready = ready
        self.stack = stack

    def dense_weight(self) -> torch.Tensor:
        """W_hat [N, K] once it is here (arch/experts.py's grouped experts read it without calling forward)."""
        if self.ready is not None:
            self.ready()
        return self.weight_hat

    def stacked(self) -> tuple[torch.Tensor, int] | None:
        """(S [B, N, K], i) once S is here (arch/experts.stacked_weights: the grouped experts read consecutive
        linears of one buffer as a slice of S, neither copied into a stack per forward nor unbound per backward)."""
        if self.ready is not None:
            self.ready()
        return self.stack

    def forward(self, x):
        """On the weight's device (a block spread over several: the input comes from the block's first
        device and the output goes back there, differentiably)."""
        if self.ready is not None:
            self.ready()
        w = self.weight_hat
        y = F.linear(x.to(w.device), w, None if self.bias is None else self.bias.to(w.dtype))
        return y.to(x.device)


@contextmanager
def fake_quant_swapped(block: torch.nn.Module, linears: dict, weights: dict, ready: dict | None = None, stacks: dict | None = None):
    """Swap each named linear for a FakeQuantLinear reading weights[name] in its parent (waiting on
    ready[name]() first, when given; stacks[name]: its buffer's stacked leaf, see FakeQuantLinear); always put
    the originals back."""
    swapped = []
    try:
        for name, linear in linears.items():
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, attr, FakeQuantLinear(linear, weights[name], (ready or {}).get(name), (stacks or {}).get(name)))
            swapped.append((parent, attr, linear))
        yield
    finally:
        for parent, attr, linear in swapped:
            setattr(parent, attr, linear)


@contextmanager
def frozen(module: torch.nn.Module):
    """No gradients for the block's own parameters while V and the factors train."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# ---------------------------------------------------------------- optimizer, schedule, loss


def linear_lr(base: float, step: int, iters: int) -> float:
    """auto-round's LinearLR(start 1, end 0): base at step 0, decaying to 0 at step `iters`."""
    return base * (1.0 - step / iters)


@torch.no_grad()
def sign_sgd_step(groups: list[tuple[list[torch.Tensor], float, tuple[float, float]]]) -> None:
    """p <- clamp(p - lr sign(grad), bounds) for each (params, lr, bounds) group; clears the grads.

    The parameters of every group with the same (lr, bounds) step together through torch's foreach
    kernels: a MoE block trains ~1,200 of them (V, min_scale, max_scale per expert linear), which stepped
    one by one were three ops each, a third of the step's host-side ops. The arithmetic is the same
    elementwise add, then the clamp (min, then max), per element."""
    together: dict[tuple, list[torch.Tensor]] = {}
    for params, lr, bounds in groups:
        together.setdefault((lr, bounds), []).extend(p for p in params if p.grad is not None)
    for (lr, (low, high)), params in together.items():
        if params:
            torch._foreach_add_(params, torch._foreach_sign([p.grad for p in params]), alpha=-lr)
            torch._foreach_clamp_min_(params, low)
            torch._foreach_clamp_max_(params, high)
            for p in params:
                p.grad = None


class Trainer:
    """The per-linear half of a step, split between data-parallel processes by owner.

    Each linear's fake quantization (the grid's forward and backward over all N x K weights) and its sign
    step do not shrink with the samples, so each process does them only for the linears it owns
    (`BlockContext.owners`, by N x K). The block reads each W_hat from a leaf tensor (`leaves`); the leaves
    of one (owner, device, role, scheme) are slices of one flat buffer, and so are their gradients, and one
    LinearState learns for all of them, so a step moves and fake-quantizes a few buffers per process, not one
    per linear (a MoE block has hundreds; its experts of one role share a buffer): `refresh` writes each
    owned buffer's W_hat [B, N, K] from its LinearState into the buffer and broadcasts it from its owner;
    after a micro-batch's backward, `through_grid` sums each gradient buffer over the processes onto its
    owner (`_launch_sums`) and runs the owned buffers' grid backward, so V / min_scale / max_scale get the
    gradient of the loss over every process's samples. Only owners hold LinearStates (V, its gradient, its
    best copy): the state is split too. One process owns everything; the broadcasts and sums are skipped.

    Experts (several processes, a MoE block trained eagerly whose experts the grouped GEMM runs): each process owns
    some of every experts module's experts (dealt out by the block's routed counts) and runs them itself on the
    pairs of every process routed to them (arch/expert_parallel.py, set on the modules by `experts_parallel`): their W_hat never travel, their
    gradients arrive whole through autograd's all-to-alls, so their buffers (`local`) are neither broadcast nor
    summed, and the other processes hold no buffer for them (Qwen3-30B-A3B: 1.2 GB of W_hat and 1.2 GB of
    gradients per step no longer move; the hidden states of the routed pairs do, both ways at once).

    Overlap (several processes): the collectives are asynchronous and waited right before their data is used.
    Buffers are broadcast in forward order as their owner fills them (the next buffer's fake quantization
    runs while the previous one travels); an eager block waits for each W_hat in its linear's forward
    (`ready`); a compiled one in a forward pre-hook of each module that holds linears (self_attn, mlp, ...),
    for that module's buffers: a wait is a graph break, so one per module, not one per linear. A gradient
    buffer's sum is launched from a hook as soon as autograd has accumulated all of its leaves (backward
    reaches the last linears first; a compiled block's pieces between the breaks are separate autograd nodes,
    so the MLP's sums travel while the attention's backward runs), in reverse forward order on every process,
    so the collectives match; `through_grid` launches what is left, then runs each owned buffer's grid
    backward as its sum arrives."""

    def __init__(self, ctx: BlockContext, config: AutoRoundConfig, out_dtype: torch.dtype, fns, wait_in_forward: bool = False, fns_many=None):
        """fns: the grid's (forward, backward) for single linears; fns_many: for buffers of several (None: fns)."""
        linears = ctx.linears
        self.ctx, self.out_dtype, self.fns, self.fns_many = ctx, out_dtype, fns, fns_many or fns
        self.rank, self.world = ctx.engine.rank, ctx.world_size
        # experts trained where they run (several processes, eager MoE blocks: arch/expert_parallel.py): an expert's
        # linears are owned by the process running it; the other linears are dealt out by size
        self.parallel = expert_parallel.plan(ctx.block, ctx.device, out_dtype, self.rank, self.world, ctx.routed) if wait_in_forward else {}
        expert_owner = {}
        for prefix, parallel in self.parallel.items():
            layout = ctx.block.get_submodule(prefix).lowbit_layout
            for e in range(layout.num_experts):
                expert_owner.update({f"{prefix}.{e}.{n}": parallel.owner(e) for n in layout.linear_names() if f"{prefix}.{e}.{n}" in linears})
        rest = [n for n in linears if n not in expert_owner]
        self.owner = {**ctx.owners(rest, cost=lambda n: linears[n].in_features * linears[n].out_features), **expert_owner}
        # buffer key (owner, device, role, scheme) -> its linears, keys in forward order (the linears' order, the
        # same on every process: the collectives match); a role's linears share one shape
        self.members: dict[tuple, list[str]] = {}
        for name, l in linears.items():
            self.members.setdefault((self.owner[name], l.weight.device, expert_role(name), ctx.schemes[name]), []).append(name)
        self.order = list(self.members)
        # buffers read and trained by their owner alone (expert-parallel experts): no broadcast, no gradient sum
        self.local = {key for key, names in self.members.items() if names[0] in expert_owner}
        # the learned state of each buffer this process owns, one LinearState for all of its linears
        self.states = {key: LinearState.from_weights([linears[n].weight for n in names], key[3], config.enable_minmax_tuning)
                       for key, names in self.members.items() if key[0] == self.rank}
        self.values, self.grads, self.leaves = {}, {}, {}
        self.stack_leaves: dict[tuple, torch.Tensor] = {}  # key -> its buffer as one leaf [B, N, K] (several linears)
        self.stacks: dict[str, tuple] = {}  # linear -> (its buffer's stacked leaf, its index there)
        for key, names in self.members.items():
            if key in self.local and key[0] != self.rank:  # another process's experts: never read here
                self.leaves.update({name: None for name in names})
                continue
            size = sum(linears[n].out_features * linears[n].in_features for n in names)
            self.values[key] = torch.zeros(size, dtype=out_dtype, device=key[1])
            self.grads[key] = torch.zeros(size, dtype=out_dtype, device=key[1])
            if len(names) > 1:  # a role's experts: the buffer as one [B, N, K] leaf too (its .grad the gradient buffer)
                shape = (len(names), linears[names[0]].out_features, linears[names[0]].in_features)
                stack = self.values[key].view(shape).detach().requires_grad_()
                stack.grad = self.grads[key].view(shape)
                self.stack_leaves[key] = stack
                self.stacks.update({name: (stack, i) for i, name in enumerate(names)})
            start = 0
            for name in names:
                l = linears[name]
                n = l.out_features * l.in_features
                # a leaf sharing the buffer's storage; its .grad a slice of the gradient buffer, which autograd
                # then accumulates into in place
                leaf = self.values[key][start : start + n].view(l.out_features, l.in_features).detach().requires_grad_()
                leaf.grad = self.grads[key][start : start + n].view_as(leaf)
                self.leaves[name] = leaf
                start += n
        self.graphs: dict[tuple, torch.Tensor] = {}  # key -> W_hat [B, N, K] with its graph (the owner's buffers)
        self.arriving: dict[tuple, object] = {}  # key -> pending broadcast of its W_hat buffer
        self.summing: dict[tuple, tuple] = {}  # key -> (float32 buffer, pending sum onto its owner)
        self.ready = {}  # linear -> wait for its W_hat (eager data-parallel blocks)
        self.hooks = []
        self.waits_in_forward = self.world > 1  # else every W_hat is waited for before the step (one process: none)
        if self.world > 1:
            if wait_in_forward:
                self.ready = {name: self._waiter(key) if self.leaves[name] is not None else self._elsewhere(name, key[0])
                              for key, names in self.members.items() for name in names}
            else:  # compiled: the module holding a linear waits for the buffers of its linears before it runs
                # (each linear is called inside its parent's forward; not so for grouped experts, whose weights
                # are read without calling the Expert modules: MoE blocks train eagerly, with per-linear waits)
                modules: dict[str, list] = {}
                for key, names in self.members.items():
                    for name in names:
                        keys = modules.setdefault(name.rpartition(".")[0], [])
                        if key not in keys:
                            keys.append(key)
                for parent, keys in modules.items():
                    module = ctx.block.get_submodule(parent) if parent else ctx.block
                    self.hooks.append(module.register_forward_pre_hook(ModuleWait(self, keys)))
            self._complete = {key: set() for key in self.order}  # leaves whose gradient autograd has accumulated
            self._launched = 0  # gradient sums started this micro-batch, in reverse forward order
            for key, names in self.members.items():
                if key not in self.local:
                    for name in names:
                        self.hooks.append(self.leaves[name].register_post_accumulate_grad_hook(self._grad_hook(key, name)))
                    if key in self.stack_leaves:  # read whole by the grouped experts: every linear's gradient at once
                        self.hooks.append(self.stack_leaves[key].register_post_accumulate_grad_hook(self._grad_hook(key, None)))

    def _waiter(self, key):
        def wait():
            self.wait_for([key])

        return wait

    @staticmethod
    def _elsewhere(name: str, owner: int):
        def refuse():
            raise RuntimeError(f"AutoRound: {name} is trained expert-parallel by process {owner}; this process called it")

        return refuse

    @contextmanager
    def experts_parallel(self):
        """While training: the block's experts modules run expert-parallel (when `parallel` planned it)."""
        modules = [(self.ctx.block.get_submodule(prefix), parallel) for prefix, parallel in self.parallel.items()]
        try:
            for module, parallel in modules:
                module.lowbit_expert_parallel = parallel
            yield
        finally:
            for module, _ in modules:
                module.lowbit_expert_parallel = None

    def wait_for(self, keys) -> None:
        for key in keys:
            pending = self.arriving.pop(key, None)
            if pending is not None:
                pending.wait()

    def _grad_hook(self, key, name: str | None):
        """name: the linear whose leaf got its gradient; None: the buffer's stacked leaf (all of its linears)."""
        def hook(_leaf):
            if key in self.summing:  # its sum already started: a linear called twice in one forward
                raise RuntimeError(f"AutoRound: {name or key[2]} received a second gradient after its buffer's sum started (a linear called twice per forward)")
            self._complete[key].update(self.members[key] if name is None else [name])
            self._launch_sums(upto=None)

        return hook

    def _launch_sums(self, upto: int | None) -> None:
        """Start the gradient sums in reverse forward order: while the next one's leaves are all accumulated
        (upto None: from the backward's hooks), or all of them (upto = len(order): after the backward).

        The grid backward reads the summed gradient in the leaves' dtype (bf16 / fp16 on a GPU), so the sum is
        rounded to it once. Two processes sum in that dtype: one addition, rounded once (NCCL adds 16-bit
        values in float32: tests/e2e/test_data_parallel.py checks it on two GPUs), the very value a float32 sum
        rounded back gives, for half the bytes of a float32 buffer and no conversion copies (a Llama-3-8B
        block: 436 MB less to move per step). More processes sum in float32: a reduction tree in 16 bits
        would round every partial sum."""
        backward_order = self.order[::-1]
        while self._launched < len(backward_order):
            key = backward_order[self._launched]
            if key in self.local:  # its gradient is whole on its owner already
                self._launched += 1
                continue
            if upto is None and len(self._complete[key]) < len(self.members[key]):
                return
            buf = self.grads[key] if self.world == 2 else self.grads[key].float()
            self.summing[key] = (buf, self.ctx.engine.start("reduce", buf, key[0]))
            self._launched += 1

    def params(self) -> list[torch.Tensor]:
        return [p for st in self.states.values() for p in st.params()]

    def refresh(self) -> None:
        """W_hat of every linear into the leaves: computed (with its graph) by the owner, broadcast to the rest
        (asynchronously: wait_arrivals, or the linears' `ready`, before they are read)."""
        self.graphs = {}
        for key, names in self.members.items():  # forward order
            if key in self.states:
                with torch.enable_grad():
                    graph = self.states[key].weight_hat(self.out_dtype, self.fns_many if len(names) > 1 else self.fns)  # [B, N, K]
                with torch.no_grad():
                    self.values[key].view_as(graph).copy_(graph)  # the buffer is the B leaves back to back
                self.graphs[key] = graph
            if self.world > 1 and key not in self.local:
                self.arriving[key] = self.ctx.engine.start("broadcast", self.values[key], key[0])

    def wait_arrivals(self) -> None:
        self.wait_for(self.order)

    def through_grid(self, last: bool) -> None:
        """After a micro-batch's backward: each gradient buffer (this process's samples) summed onto its owner,
        then through the owned linears' grid into V and the min/max factors (accumulating over micro-batches)."""
        if self.world == 1:
            if self.graphs:
                keys = list(self.graphs)
                torch.autograd.backward([self.graphs[k] for k in keys], [self.grads[k].view_as(self.graphs[k]) for k in keys], retain_graph=not last)
        else:
            self._launch_sums(upto=len(self.order))
            for key in self.order[::-1]:  # the order they were started in
                if key in self.local:  # expert-parallel: the gradient buffer holds every process's share already
                    if key in self.graphs:
                        graph = self.graphs[key]
                        torch.autograd.backward([graph], [self.grads[key].view_as(graph)], retain_graph=not last)
                    continue
                buf, pending = self.summing.pop(key)
                pending.wait()
                if key in self.graphs:  # the owner's
                    graph = self.graphs[key]
                    torch.autograd.backward([graph], [buf.view_as(graph).to(self.out_dtype)], retain_graph=not last)
            self._complete = {key: set() for key in self.order}
            self._launched = 0
        for g in self.grads.values():
            g.zero_()
        if last:
            self.graphs = {}

    def clear(self) -> None:
        """Forget a failed step (a compiled block that did not compile): its started collectives are waited
        (every process failed at the same point), gradients zeroed."""
        self.wait_arrivals()
        for _, pending in self.summing.values():
            pending.wait()
        self.summing = {}
        if self.world > 1:
            self._complete = {key: set() for key in self.order}
            self._launched = 0
        for p in self.params():
            p.grad = None
        for g in self.grads.values():
            g.zero_()

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def mean_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The step's loss averaged over the processes (each the mean over its share of the global batch), []
        float32 on the device, not synchronized with the host: every process keeps the same best iteration."""
        loss = loss.reshape(()).float()
        if self.world == 1:
            return loss
        buf = loss.clone()
        self.ctx.engine.start("all_reduce", buf).wait()
        return buf / self.world


def block_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE over every element, in fp32; pred / target [b, T, H]."""
    return F.mse_loss(pred.float(), target.float())


class IndexSampler:
    """Shuffled sample indices, `size` at a time; reshuffles when fewer than `size` remain (like auto-round)."""

    def __init__(self, n: int, size: int, seed: int):
        self.n, self.size = n, size
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.pos = torch.randperm(n, generator=self.gen).tolist(), 0

    def next(self) -> list[int]:
        if self.pos + self.size > self.n:
            self.order, self.pos = torch.randperm(self.n, generator=self.gen).tolist(), 0
        out = self.order[self.pos : self.pos + self.size]
        self.pos += self.size
        return out


# ---------------------------------------------------------------- training setup


def autocast_dtype(block: torch.nn.Module, device: torch.device, config: AutoRoundConfig) -> torch.dtype | None:
    """16-bit autocast on CUDA (the block's own 16-bit dtype, else bf16); None (fp32) on the CPU."""
    if device.type != "cuda" or not config.amp:
        return None
    dtype = next(block.parameters()).dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def step_sizes(config: AutoRoundConfig, scheme: Scheme) -> tuple[float, float]:
    """(lr for V, lr for the factors); auto-round doubles the default lr at <= 3 bits with >= 1000 iters."""
    if config.lr is None and config.iters >= 1000 and scheme.bits <= 3:
        lr = 2.0 / config.iters
        return lr, config.minmax_lr if config.minmax_lr is not None else lr
    return config.step_size, config.minmax_step_size


def _first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


@dataclass
class Compilers:
    """What torch.compile gave (or failed to give) this run: owned by the run (BlockContext.run_state), so
    the blocks of one run share the compiled grid and a compiler failure is paid once, and nothing lives at
    module level for tests or benchmarks to flip."""

    grid: tuple | None = None
    grid_many: tuple | None = None
    grid_failed: str | None = None
    block_failed: str | None = None

    def grid_fns(self, compile_: bool | None, device: torch.device, many: bool = False):
        """The fake-quant forward/backward pair: compiled (compile_ True, or None on CUDA) or eager.

        many: for buffers of several linears (a role's experts, [B, N, G, gs]), whose B differs between blocks
        and processes (experts dealt out by load, RTN fallbacks): compiled with dynamo's automatic dynamic
        shapes, so a second B makes the changed sizes symbolic and later ones reuse that code, instead of one
        compile per B (a 48-block MoE run would pass dynamo's recompile limit and silently run eagerly). The
        single linears keep static shapes (a handful per architecture, each compiled once).

        A compiler that cannot run here (no C compiler, an unsupported GPU, ...) shows up on the first call;
        a smoke call on a tiny weight finds out once per run, and the eager pair is used with a warning."""
        if compile_ is None:
            compile_ = device.type == "cuda"
        if not compile_ or self.grid_failed:
            return (fq_forward, fq_backward)
        if many:
            if self.grid_many is None:
                self.grid_many = (torch.compile(fq_forward), torch.compile(fq_backward))
            return self.grid_many
        if self.grid is None:
            fns = (torch.compile(fq_forward, dynamic=False), torch.compile(fq_backward, dynamic=False))
            try:
                x = torch.randn(2, 1, 8, device=device)
                s, z = torch.ones(2, 1, 1, device=device), torch.zeros(2, 1, 1, device=device)
                _, qz, inside = fns[0](x, torch.zeros_like(x), s, z, 15, torch.float32)
                fns[1](torch.ones_like(x), x, s, qz, inside)
            except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
                self.grid_failed = _first_line(exc)
                warnings.warn(f"torch.compile of the AutoRound grid failed ({self.grid_failed}); running it eagerly", stacklevel=2)
                return (fq_forward, fq_backward)
            self.grid = fns
        return self.grid

    def block(self, block: torch.nn.Module, compile_: bool | None, device: torch.device) -> torch.nn.Module:
        """The block as the training loop calls it: torch.compile'd when compile is on (None: on CUDA), else itself.

        Compiling the whole training forward (with the swapped-in fake-quant linears) fuses the norms, rotary,
        activations and autocast casts around the matmuls and, through AOTAutograd, their backward: on an H100
        (bench/autoround_speed.py, Llama-3-8B blocks, auto-round's defaults) 7.8 s per block against 9.3 s with
        only the grid compiled, and 0.9 GB less peak VRAM; the block losses agree to 3 digits. Blocks of one
        architecture share the compiled code (dynamo treats module parameters as inputs), so only the first
        block pays the compile. A failure is caught on the first step (quantize_block) and the run goes on
        eagerly."""
        if compile_ is None:
            compile_ = device.type == "cuda"
        if not compile_ or self.block_failed:
            return block
        return torch.compile(block)

    def block_compile_failed(self, exc: Exception) -> None:
        self.block_failed = _first_line(exc)
        warnings.warn(f"torch.compile of the AutoRound block failed ({self.block_failed}); running it eagerly", stacklevel=3)


@contextmanager
def recompile_limit(limit: int):
    """Raise dynamo's per-code recompile limit while training: blocks whose guards differ (sliding and global
    attention layers, another dtype) each need an entry, and hitting the default (8) silently drops to eager."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    with cfg.patch(**{name: max(getattr(cfg, name), limit)}):
        yield


# ---------------------------------------------------------------- the block


def quantize_block(ctx: BlockContext, config: AutoRoundConfig | None = None) -> dict[str, QuantResult]:
    config = config or AutoRoundConfig()
    linears, device = ctx.linears, ctx.device
    if not linears or config.iters == 0 or not ctx.calibrated:
        return {n: quantize_weight(l.weight.data, ctx.schemes[n], bias=l.bias) for n, l in linears.items()}
    started = time.time()
    block = ctx.block.eval()
    amp = autocast_dtype(block, device, config)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext
    out_dtype = amp or next(block.parameters()).dtype
    n, bs = ctx.n_samples, min(ctx.batch_size, ctx.n_samples)

    # fp targets per sample [1, T, H], where the engine keeps its samples (the device unless low_gpu_mem)
    targets = ctx.targets
    if targets is None:  # the block's own fp outputs on the quantized chain's inputs
        with torch.no_grad(), autocast(), ctx.phase("targets"):
            targets = [ctx.engine.store(t.unsqueeze(0)) for indices in ctx.batches() for t in ctx.forward(indices)]

    def gather_targets(indices: list[int]) -> torch.Tensor:
        return torch.cat([targets[i].to(device, non_blocking=True) for i in indices])

    with ctx.phase("setup"):  # the trainer's buffers, the grid's compiled functions: before the first step
        compilers = ctx.run_state.setdefault("autoround.compilers", Compilers())
        fns, fns_many = compilers.grid_fns(config.compile, device), compilers.grid_fns(config.compile, device, many=True)
        # eager when the block is spread over several devices (one compiled graph would span several GPUs) or is a
        # mixture-of-experts block (each expert runs on the tokens routed to it: data-dependent shapes that would
        # recompile on every batch); the grid functions stay compiled
        eager = len({l.weight.device for l in linears.values()}) > 1 or bool(experts_modules(block))
        train_block = block if eager else compilers.block(block, config.compile, device)
        trainer = Trainer(ctx, config, out_dtype, fns, wait_in_forward=train_block is block, fns_many=fns_many)
        states = trainer.states  # per buffer this process owns (all of them for one process)
        groups = []
        for st in states.values():
            lr, minmax_lr = step_sizes(config, st.scheme)
            groups.append(([st.v], lr, (-V_BOUND, V_BOUND)))
            if config.enable_minmax_tuning:
                groups.append(([st.min_scale, st.max_scale], minmax_lr, MINMAX_BOUNDS))
        best = {key: [p.detach().clone() for p in (st.v, st.min_scale, st.max_scale)] for key, st in states.items()}

        # samples per step: one process's, divided over the data-parallel processes (each from its own share)
        global_bs = min(n, -(-bs * config.gradient_accumulate_steps // ctx.world_size))
        bs = min(bs, global_bs)
        sampler = IndexSampler(n, global_bs, config.seed + ctx.index)
        # the best step is tracked on the device: no host synchronization per step (the host queues the next
        # step while the device runs this one); the same float32 comparison as on the host
        first_loss, best_loss, best_iter = None, torch.full((), float("inf"), device=device), torch.zeros((), dtype=torch.int64, device=device)
        # steps whose loss is NaN / inf (never "better": the export keeps the best finite step), and the first of them
        nonfinite, first_nonfinite = torch.zeros((), dtype=torch.int64, device=device), torch.full((), -1, dtype=torch.int64, device=device)

    def step_loss(run_block, indices: list[int]) -> torch.Tensor:
        """Forward and backward over one global batch (micro-batches of bs); returns its mean loss []."""
        total = torch.zeros((), device=device)
        starts = range(0, global_bs, bs)
        for j, start in enumerate(starts):
            idx = indices[start : start + bs]
            with autocast():
                pred = ctx.forward(idx, block=run_block)
            # mean over the global batch: each micro-batch weighs by its share of the samples
            loss = block_loss(pred, gather_targets(idx)) * (len(idx) / global_bs)
            loss.backward()
            trainer.through_grid(last=j == len(starts) - 1)
            total += loss.detach()
        return total

    with frozen(block), fake_quant_swapped(block, linears, trainer.leaves, trainer.ready, trainer.stacks), trainer.experts_parallel(), \
            torch.enable_grad(), recompile_limit(64), ctx.phase("train"):
        for it in range(config.iters):
            indices = sampler.next()
            trainer.refresh()
            if not trainer.waits_in_forward:
                trainer.wait_arrivals()
            if train_block is block or it > 0:
                value = step_loss(train_block, indices)
            else:  # the first compiled step compiles forward and backward: fall back to eager if that fails
                try:
                    value = step_loss(train_block, indices)
                except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
                    compilers.block_compile_failed(exc)
                    trainer.clear()
                    trainer.refresh()
                    trainer.wait_arrivals()
                    train_block = block
                    value = step_loss(block, indices)
            trainer.wait_arrivals()  # W_hat of linears the forward did not call (unrouted experts): before the next refresh
            value = trainer.mean_loss(value)
            if first_loss is None:
                first_loss = value
            bad = ~torch.isfinite(value)
            nonfinite += bad
            first_nonfinite.masked_fill_(bad & (first_nonfinite < 0), it)
            better = value < best_loss  # these parameters produced this loss: keep them before stepping
            best_loss = torch.where(better, value, best_loss)
            best_iter.masked_fill_(better, it)
            on = {}  # `better` lives with the loss; a block split over GPUs keeps some linears' state on another
            for key, st in states.items():
                for dst, src in zip(best[key], (st.v, st.min_scale, st.max_scale)):
                    torch.where(on.setdefault(dst.device, better.to(dst.device)), src.detach(), dst, out=dst)
            sign_sgd_step([(ps, linear_lr(lr, it, config.iters), bounds) for ps, lr, bounds in groups])

    trainer.close()
    first_loss, best_loss, best_iter = float(first_loss), float(best_loss), int(best_iter)
    diverged = ""
    if int(nonfinite):  # said, not hidden: a run whose training diverged still exports, from what it can vouch for
        kept = f"the best finite step ({best_iter}) is exported" if math.isfinite(best_loss) else "no step had a finite loss: the round-to-nearest start is exported"
        diverged = f"AutoRound's loss was not finite in {int(nonfinite)} of {config.iters} steps (the first at step {int(first_nonfinite)}); {kept}"
        if ctx.engine.rank == 0:  # every process has the same mean losses: one warning, not one per process
            warnings.warn(f"block {ctx.index}: {diverged}", stacklevel=2)
    results = {}
    with ctx.phase("export"):  # the best rounding of each linear quantized by its owner, shared with the others
        for key, names in trainer.members.items():
            mine = None  # a buffer's linears (one owner, device and role) shared together: two broadcasts
            if key in states:
                mine = []
                for i, name in enumerate(names):
                    v, mn, mx = states[key].export(i, *best[key])
                    mine.append(quantize_weight(linears[name].weight.data, ctx.schemes[name], v=v, min_scale=mn, max_scale=mx))
            shared, _ = ctx.shared_results(key[0], mine, [0.0] * len(names), [linears[n] for n in names])
            for name, result in zip(names, shared):
                result.bias = None if linears[name].bias is None else linears[name].bias.detach().clone()
                results[name] = result
    results = {name: results[name] for name in linears}  # the block's order
    ctx.losses = (first_loss, best_loss)
    if ctx.log:
        ctx.log(f"block {ctx.index}: loss {first_loss:.4g} -> {best_loss:.4g} (best at iter {best_iter}/{config.iters}), {time.time() - started:.1f}s"
                + (f"; {diverged}" if diverged else ""))
    return results


register_algorithm(AutoRoundConfig, quantize_block)
