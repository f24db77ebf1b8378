"""Dense experts run as grouped GEMMs (arch/experts.py `dense_grouped_forward`): the unfused experts module's
output and its gradients, for the weights, biases and inputs, against transformers' own fused experts module
run in float64 on the same routes (an independent implementation and precision); a hooked linear keeps the
per-expert loop, so statistics see each expert's routed rows."""

from __future__ import annotations

import pytest
import torch

from lowbit.arch.experts import dense_grouped_applies, experts_modules
from lowbit.model import Checkpoint, build_skeleton
from lowbit.model.names import map_names
from lowbit.model.skeleton import load_tensors
from tests.arch.tiny import TINY_TEXT, save_tiny_checkpoint


def fused_and_unfused(arch, path):
    """Layer 0's experts: transformers' fused module (float64, its own experts implementation) and lowbit's
    unfused one (float32, loaded from the same checkpoint)."""
    fp_model = save_tiny_checkpoint(arch, path, TINY_TEXT)
    ckpt = Checkpoint(path)
    skeleton = build_skeleton(ckpt.config)
    load_tensors(skeleton, list(skeleton.state_dict(keep_vars=True).items()), ckpt, map_names(skeleton, ckpt.index), "cpu", torch.float32)
    unfused = next(iter(experts_modules(skeleton).values()))
    fused = next(m for m in fp_model.modules() if hasattr(m, "has_gate")).double()
    fused.config._experts_implementation = "eager"
    return fused, unfused


def routes(tokens: int, experts: int, k: int, seed: int = 0):
    """top_k_index [T, k] (distinct experts per token; expert 1 never chosen: an expert without rows) and
    router weights [T, k]."""
    gen = torch.Generator().manual_seed(seed)
    pool = [e for e in range(experts) if e != 1]
    index = torch.stack([torch.tensor(pool)[torch.randperm(len(pool), generator=gen)[:k]] for _ in range(tokens)])
    return index, torch.rand(tokens, k, generator=gen, dtype=torch.float64).softmax(-1)


def fused_grads(fused, layout, e: int) -> dict[str, torch.Tensor]:
    """Expert e's per-linear gradients out of the fused module's 3-D gradients ([E, out, in], or [E, in, out]
    transposed; gate/up split by the layout)."""
    out = {}
    for p in (layout.first, "down_proj"):
        g = getattr(fused, p).grad[e]
        g = g.t() if layout.transposed else g
        for name, part in zip(layout.names[p], layout.split(p, g)):
            out[f"{name}.weight"] = part
        if layout.bias:
            for name, part in zip(layout.names[p], layout.split(p, getattr(fused, f"{p}_bias").grad[e])):
                out[f"{name}.bias"] = part
    return out


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "GptOssForCausalLM"])
def test_grouped_forward_and_gradients_match_the_fused_module_in_float64(arch, tmp_path):
    """Qwen3-MoE (gate/up concatenated, no bias) and gpt-oss (transposed, interleaved, biases, its own clamped
    gate): outputs and every gradient agree with transformers' fused module at float32 precision."""
    fused, unfused = fused_and_unfused(arch, tmp_path)
    layout = unfused.lowbit_layout
    hidden = torch.randn(24, fused.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    index, weights = routes(24, layout.num_experts, fused.config.num_experts_per_tok)

    x64 = hidden.clone().requires_grad_()
    want = fused(x64, index, weights)
    upstream = torch.randn_like(want)
    (want * upstream).sum().backward()

    for p in unfused.parameters():
        p.requires_grad_(True)
    x32 = hidden.float().requires_grad_()
    assert dense_grouped_applies(unfused, x32)
    got = unfused(x32, index, weights.float())
    (got * upstream.float()).sum().backward()

    scale = want.abs().max()
    assert (got.double() - want).abs().max() <= 1e-5 * scale
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-5 * x64.grad.abs().max().item())
    for e in range(layout.num_experts):
        expert = getattr(unfused, str(e))
        for name, g in fused_grads(fused, layout, e).items():
            mine = expert.get_parameter(name).grad
            if e == 1:  # no token routed to it: no gradient (or a zero one)
                assert mine is None or not mine.any()
                continue
            torch.testing.assert_close(mine.double(), g, rtol=1e-4, atol=1e-5 * max(g.abs().max().item(), 1e-12))


def test_a_hooked_expert_linear_keeps_the_loop_and_sees_its_routed_rows(tmp_path):
    """A forward hook on one expert's linear (statistics): the grouped path steps aside, the hook sees exactly
    the rows routed to that expert, and the output is unchanged."""
    _, unfused = fused_and_unfused("Qwen3MoeForCausalLM", tmp_path)
    hidden = torch.randn(16, unfused.lowbit_layout.num_experts and getattr(unfused, "0").gate_proj.in_features)
    index, weights = routes(16, unfused.lowbit_layout.num_experts, 2, seed=2)
    weights = weights.float()
    grouped = unfused(hidden, index, weights)
    seen = []
    handle = getattr(unfused, "0").gate_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        assert not dense_grouped_applies(unfused, hidden)
        looped = unfused(hidden, index, weights)
    finally:
        handle.remove()
    rows = (index == 0).any(-1).nonzero().flatten()
    assert len(seen) == 1 and torch.equal(seen[0], hidden[rows])
    torch.testing.assert_close(looped, grouped, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stack_bytes", [1, 3 * 32 * 64 * 4])
def test_experts_stacked_in_chunks_compute_the_same_forward_and_gradients(tmp_path, stack_bytes):
    """Past `lowbit_stack_bytes` the experts' weights are stacked a chunk at a time (one expert, or three of the
    8): the output and every gradient equal the single grouped GEMM's."""
    _, unfused = fused_and_unfused("Qwen3MoeForCausalLM", tmp_path)
    layout = unfused.lowbit_layout
    hidden = torch.randn(20, getattr(unfused, "0").gate_proj.in_features, generator=torch.Generator().manual_seed(4))
    index, weights = routes(20, layout.num_experts, 2, seed=5)
    for p in unfused.parameters():
        p.requires_grad_(True)

    def run():
        unfused.zero_grad(set_to_none=True)
        x = hidden.clone().requires_grad_()
        y = unfused(x, index, weights.float())
        (y * y).sum().backward()
        return y.detach(), x.grad, [p.grad.clone() if p.grad is not None else None for p in unfused.parameters()]

    whole = run()
    unfused.lowbit_stack_bytes = stack_bytes
    chunked = run()
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked[1], whole[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(chunked[2], whole[2]):
        assert (a is None and b is None) or torch.allclose(a if a is not None else torch.zeros_like(b), b if b is not None else torch.zeros_like(a), rtol=1e-6, atol=1e-6)


def test_fake_quant_experts_read_from_one_buffer_without_a_copy(tmp_path):
    """AutoRound's expert linears whose W_hat are consecutive entries of one buffer (FakeQuantLinear `stack`): the
    grouped GEMM reads the buffer itself, so the whole gradient lands in the buffer's stacked leaf (accumulated in
    place into the gradient buffer its .grad was set to, as the Trainer sets it), none in the per-linear leaves;
    output, input and weight gradients equal transformers' fused module in float64."""
    from lowbit.algorithms.autoround import fake_quant_swapped

    fused, unfused = fused_and_unfused("Qwen3MoeForCausalLM", tmp_path)
    layout = unfused.lowbit_layout
    hidden = torch.randn(24, fused.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    index, weights = routes(24, layout.num_experts, fused.config.num_experts_per_tok)
    x64 = hidden.clone().requires_grad_()
    want = fused(x64, index, weights)
    (want * want).sum().backward()

    linears, leaves, stacks, whole, grads = {}, {}, {}, {}, {}
    for name in layout.linear_names():  # one buffer per projection: [E, N, K], its leaves views of it
        buffer = torch.stack([getattr(unfused, str(e)).get_submodule(name).weight.detach() for e in range(layout.num_experts)])
        whole[name] = buffer.clone().requires_grad_()
        grads[name] = torch.zeros_like(buffer)  # the Trainer's gradient buffer: autograd must accumulate into it in place
        whole[name].grad = grads[name]
        for e in range(layout.num_experts):
            key = f"{e}.{name}"
            linears[key] = getattr(unfused, str(e)).get_submodule(name)
            leaves[key] = buffer[e].detach().requires_grad_()
            stacks[key] = (whole[name], e)
    x32 = hidden.float().requires_grad_()
    with fake_quant_swapped(unfused, linears, leaves, stacks=stacks):
        got = unfused(x32, index, weights.float())
        (got * got).sum().backward()
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-5 * x64.grad.abs().max().item())
    assert all(leaf.grad is None for leaf in leaves.values())
    for e in range(layout.num_experts):
        for name, g in fused_grads(fused, layout, e).items():
            linear = name.rpartition(".")[0]
            torch.testing.assert_close(grads[linear][e].double(), g, rtol=1e-4, atol=1e-5 * max(g.abs().max().item(), 1e-12))
