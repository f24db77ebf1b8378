"""Expert-parallel experts (arch/expert_parallel.py) in two gloo processes, against transformers' own fused experts
module run in float64 on all the tokens in one process (an independent implementation and precision).

Each process holds half of the tokens and runs only the experts it owns (dealt out by routed load, or in ranges) on
the pairs of both processes routed to them; the gradients its owned experts receive must be those of the whole
batch (both processes' losses), its outputs and input gradients those of its own tokens."""

from __future__ import annotations

import pytest
import torch

from lowbit.arch.expert_parallel import ExpertParallel, owned_ranges, owners_by_load
from tests.e2e.test_data_parallel import rendezvous
from tests.unit.test_grouped_dense_experts import fused_and_unfused, fused_grads, routes

TOKENS = 24


def case(arch: str, path, routing: str):
    """(fused float64 module, unfused float32 module, hidden [T, H] float64, top_k_index, router weights, owners)."""
    fused, unfused = fused_and_unfused(arch, path)
    layout = unfused.lowbit_layout
    hidden = torch.randn(TOKENS, fused.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    index, weights = routes(TOKENS, layout.num_experts, fused.config.num_experts_per_tok)
    owners = owned_ranges(layout.num_experts, 2)  # rank 0: experts 0-3, rank 1: 4-7
    if routing == "first_owner_only":  # every pair to rank 0's experts: rank 1 receives no row at all
        index = index % 4
        index[:, 1] = (index[:, 0] + 1) % 4  # distinct experts per token
    if routing == "by_load":  # owners interleaved as the routed counts deal them out
        owners = owners_by_load(torch.bincount(index.flatten(), minlength=layout.num_experts).tolist(), 2)
        assert owners != sorted(owners)
    return fused, unfused, hidden, index, weights, owners


def worker(rank: int, store: str, arch: str, path: str, routing: str, out: str):
    import datetime

    # a process left waiting in an all-to-all fails the test within a minute instead of hanging it
    torch.distributed.init_process_group("gloo", store=torch.distributed.FileStore(store, 2), rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    _, unfused, hidden, index, weights, owners = case(arch, path, routing)
    layout = unfused.lowbit_layout
    mine = slice(rank * TOKENS // 2, (rank + 1) * TOKENS // 2)
    unfused.lowbit_expert_parallel = ExpertParallel(owners, rank, 2)
    for p in unfused.parameters():
        p.requires_grad_(True)
    # "first_owner_only": the input needs no gradient, so only the experts' W_hat put the all-to-alls in the graph
    x = hidden[mine].float().requires_grad_(routing != "first_owner_only")
    y = unfused(x, index[mine], weights[mine].float())
    upstream = torch.randn(TOKENS, y.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(2))[mine]
    (y * upstream.float()).sum().backward()
    owned = [e for e, r in enumerate(owners) if r == rank]
    grads = {e: {n: p.grad for n, p in getattr(unfused, str(e)).named_parameters()} for e in owned}
    # a process's other experts are never run here
    assert all(p.grad is None for e in range(layout.num_experts) if e not in owned for p in getattr(unfused, str(e)).parameters())
    torch.save({"y": y.detach(), "x_grad": x.grad, "grads": grads}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("arch,routing", [("Qwen3MoeForCausalLM", "by_load"), ("GptOssForCausalLM", "spread"), ("Qwen3MoeForCausalLM", "first_owner_only")])
def test_two_processes_match_the_fused_module_on_all_tokens(arch, routing, tmp_path):
    """Outputs and input gradients per process, and each owned expert's weight (and bias) gradients over both
    processes' tokens, against the fused module on all tokens in float64. Qwen3-MoE with experts dealt out by
    routed load (interleaved owners); gpt-oss (transposed, interleaved gate/up, biases) in ranges;
    "first_owner_only": rank 1 owns experts no pair is routed to, so it
    receives no row and must still take part in the backward all-to-all (or both processes wait), also when the
    input needs no gradient (only rank 0's experts then put the all-to-alls in the graph)."""
    fused, unfused, hidden, index, weights, _ = case(arch, tmp_path / "m", routing)
    torch.multiprocessing.spawn(worker, args=(rendezvous(tmp_path), arch, str(tmp_path / "m"), routing, str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    x64 = hidden.clone().requires_grad_()
    want = fused(x64, index, weights)
    upstream = torch.randn(TOKENS, want.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (want * upstream).sum().backward()

    got = torch.cat([p["y"] for p in parts]).double()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    if routing != "first_owner_only":
        torch.testing.assert_close(torch.cat([p["x_grad"] for p in parts]).double(), x64.grad, rtol=1e-4, atol=1e-5 * x64.grad.abs().max().item())
    seen = 0
    for part in parts:
        for e, grads in part["grads"].items():
            expected = fused_grads(fused, unfused.lowbit_layout, e)
            for name, g in grads.items():
                ref = expected[name]
                if g is None:  # an expert no pair reached
                    assert ref.abs().max() == 0, (e, name)
                    continue
                seen += 1
                torch.testing.assert_close(g.double(), ref, rtol=1e-4, atol=1e-5 * max(ref.abs().max().item(), 1e-12), msg=f"expert {e} {name}")
    assert seen > 0


def test_experts_dealt_out_by_load():
    """Hand-worked: one expert with most pairs (what random-weight routers do) gets a process to itself, every other
    expert goes to the other (its 15 experts cost 15 x (10 + 26.25) < 900 + 26.25); even counts alternate (ties by
    expert index); without counts, ranges."""
    assert owners_by_load([900, *[10] * 15], 2) == [0, *[1] * 15]
    assert owners_by_load([5, 5, 5, 5], 2) == [0, 1, 0, 1]
    assert owners_by_load([1, 2, 3, 4, 5, 6], 3) == [0, 1, 2, 2, 1, 0]
    assert owned_ranges(5, 2) == [0, 0, 0, 1, 1]
