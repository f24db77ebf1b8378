"""Expert parallelism for data-parallel AutoRound on mixture-of-experts blocks.

Data-parallel training of a MoE block without it: every process runs every expert on its own share of the
tokens, so each step every expert's W_hat travels from its owner to the other processes and every expert's
gradient back (Qwen3-30B-A3B: 1.2 GB each way per step, by broadcast and reduce, one direction of the link at a
time), and each process stacks all experts' weights for the grouped GEMM. With expert parallelism each process
runs only the experts it owns (dealt out by routed load, `owners_by_load`), on the (token, slot) pairs of every
process routed to them: the pairs' hidden states go to their experts' owner and the outputs come back, two
all-to-alls forward and two backward (autograd's), [pairs, H] each (Qwen3-30B-A3B, 2 x 4 x 2048 tokens, top 8:
~0.27 GB per all-to-all, half of it crossing, both directions at once). The owned experts' W_hat never leave their owner, and their gradients
arrive complete (every process's loss flowed back through the all-to-alls): nothing to broadcast or sum.

Set by AutoRound's Trainer on each experts module of the block while it trains (`lowbit_expert_parallel`, never
process-wide); `experts_forward` hands the call here. Every process must call each experts module the same number
of times in the same order (the block's forwards are in lockstep: same micro-batches on every process).
"""

from __future__ import annotations

import torch

from .experts import ExpertLayout, hooked, experts_modules, grouped_mm_runs, grouped_rows


def owners_by_load(counts: list[int], world: int) -> list[int]:
    """Each expert's process, balancing the estimated per-step work: an expert costs its routed pairs plus its
    fixed part (the grid's forward and backward over its weights and its sign step, which do not grow with the
    tokens), taken as 0.4 of the pairs of an expert routed the mean count: a first estimate, with which the
    two-H200 figures were measured (docs/architecture.md, stop 26); that run's one-GPU profile puts the grid's
    kernels, sign steps and best copies nearer 1-2x the experts' grouped GEMMs, so the weight is still to tune).
    Greedy, largest first onto the least-loaded process; ties by expert index, so every process gets the same
    answer from the same (reduced) counts. Routers are rarely even (random-weight checkpoints send one
    expert most tokens), and with contiguous ranges one process would wait for the other at every all-to-all."""
    fixed = 0.4 * sum(counts) / max(len(counts), 1)
    load, out = [0.0] * world, [0] * len(counts)
    for e in sorted(range(len(counts)), key=lambda e: (-counts[e], e)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[e] = r
        load[r] += counts[e] + fixed
    return out


def owned_ranges(num_experts: int, world: int) -> list[int]:
    """Each expert's process when no counts are known: contiguous ranges, sizes differing by at most one."""
    base, extra = divmod(num_experts, world)
    return [r for r in range(world) for _ in range(base + (r < extra))]


def applies(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether an experts module can train expert-parallel: all of its experts' projections are dense weights on
    `device` with widths the grouped GEMM reads (multiples of 8), unhooked, and the grouped GEMM runs for `dtype`
    there. Otherwise the Trainer keeps plain data parallelism (every process runs every expert)."""
    layout: ExpertLayout = module.lowbit_layout
    if not grouped_mm_runs(device, dtype):
        return False
    for e in range(layout.num_experts):
        expert = getattr(module, str(e))
        for name in layout.linear_names():
            linear = getattr(expert, name)
            w = linear.weight
            if hooked(linear) or w.device != device or w.dim() != 2 or w.shape[0] % 8 or w.shape[1] % 8:
                return False
    return True


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward is the reverse all_to_all of the gradient (the splits swapped).
    torch.distributed.nn.functional's is deprecated and its replacement is private; this is the same 10 lines."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        torch.distributed.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(g.contiguous(), in_splits, out_splits, ctx.group), None, None, None


class ExpertParallel:
    """One experts module's expert-parallel forward (see the module docstring).

    owners: each expert's process (owners_by_load or owned_ranges); rank: this process's; group: the process
    group (None: the default)."""

    def __init__(self, owners: list[int], rank: int, world: int, group=None):
        self.owners, self.rank, self.world, self.group = list(owners), rank, world, group
        self.owned = [[e for e, r in enumerate(owners) if r == p] for p in range(world)]  # each process's experts, ascending
        self.tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def owner(self, expert: int) -> int:
        return self.owners[expert]

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(owner per expert [E + 1], the sentinel's = world: sorts last; the experts in owner-major order [E])."""
        if device not in self.tables:
            self.tables[device] = (torch.tensor([*self.owners, self.world], device=device),
                                   torch.tensor([e for p in self.owned for e in p], device=device))
        return self.tables[device]

    def __call__(self, module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H], top_k_index / top_k_weights [T, k] -> [T, H] (hidden_states' dtype, float32
        accumulation), the same as the module's full forward; one host sync (the all-to-all sizes)."""
        layout: ExpertLayout = module.lowbit_layout
        num_experts, k, world = layout.num_experts, top_k_index.shape[-1], self.world
        mine = self.owned[self.rank]
        owner_of, owner_major = self._tables(hidden_states.device)
        flat = top_k_index.reshape(-1).clamp(max=num_experts)  # [P], pair t * k + s; sentinels (no expert) = E
        order = torch.sort(owner_of[flat] * (num_experts + 1) + flat, stable=True).indices  # [P] by owner, then expert
        # [E] pairs per expert here, owner-major; counted by index_add_, which, unlike CUDA's bincount (it reads the
        # largest index to size its output), does not wait for the device
        counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))[:num_experts][owner_major]
        # every owner learns how many pairs of each process its experts get: [world * len(mine)], source-major
        received = counts.new_empty(world * len(mine))
        torch.distributed.all_to_all_single(received, counts, [len(mine)] * world, [len(p) for p in self.owned], group=self.group)
        host = torch.cat([counts, received]).tolist()  # the one host sync: the all-to-alls' split sizes
        sent, got = host[:num_experts], host[num_experts:]
        bounds = [0]
        for p in self.owned:
            bounds.append(bounds[-1] + len(p))
        send_splits = [sum(sent[bounds[p] : bounds[p + 1]]) for p in range(world)]  # pairs this process sends to each owner
        recv_splits = [sum(got[s * len(mine) : (s + 1) * len(mine)]) for s in range(world)]  # pairs each process sends here
        order = order[: sum(send_splits)]
        token, slot = order // k, order % k

        rows = _AllToAll.apply(hidden_states[token], recv_splits, send_splits, self.group)  # [R, H], source-major, by expert within
        # each received row's expert (index into `mine`), then the rows regrouped by expert across the sources
        # [world, E_mine], from the device's copy of the counts: a tensor made from the host's would wait for the
        # rows' all-to-all before the host could queue anything after it (a blocking copy in stream order)
        per_source = received.view(world, len(mine))
        local = torch.arange(len(mine), device=rows.device).repeat(world).repeat_interleave(per_source.reshape(-1), output_size=rows.shape[0])
        regroup = torch.sort(local, stable=True).indices  # [R]
        experts = [getattr(module, str(e)) for e in mine]
        if rows.shape[0] and experts:
            y = grouped_rows(module, rows[regroup], local[regroup], per_source.sum(0), experts)  # [R, H] by expert
            y = y[torch.argsort(regroup)]  # back to the received order
        else:  # no pair for this process's experts (or it owns none)
            y = rows * 0
        if torch.is_grad_enabled() and not y.requires_grad:
            # the other processes' outputs carry their experts' W_hat, so their backward runs the reverse
            # all-to-all; this one must too, or they wait for it forever
            y = y.detach().requires_grad_()
        back = _AllToAll.apply(y, send_splits, recv_splits, self.group)  # [pairs sent, H]: each pair's expert output
        weighted = back.float() * top_k_weights[token, slot, None].float()
        out = torch.zeros(hidden_states.shape[0], hidden_states.shape[-1], dtype=torch.float32, device=hidden_states.device)
        return out.index_add_(0, token, weighted).to(hidden_states.dtype)


def plan(block: torch.nn.Module, device: torch.device, dtype: torch.dtype, rank: int, world: int,
         routed: dict[str, list[int]] | None = None) -> dict[str, ExpertParallel]:
    """Experts module name (block-relative) -> its ExpertParallel, for each experts module that can train
    expert-parallel on `device` in `dtype` (all of them, or none: a block mixes no modes); {} for one process.
    routed: the routed calibration pairs per expert of each module (summed over the processes, so the same
    everywhere): experts are dealt out by load (owners_by_load); without, in contiguous ranges."""
    if world < 2:
        return {}
    modules = experts_modules(block)
    if not modules or not all(applies(m, device, dtype) for m in modules.values()):
        return {}
    out = {}
    for name, m in modules.items():
        counts = (routed or {}).get(name)
        owners = owners_by_load(counts, world) if counts else owned_ranges(m.lowbit_layout.num_experts, world)
        out[name] = ExpertParallel(owners, rank, world)
    return out
