"""The block engine's contract, for every registered architecture: the captured block inputs, replayed
block by block, reproduce the full model's forward for every sample, at batch sizes 1, 2 and n.

The reference is the model's own forward on one sample at a time (the input of the final norm). This is
what every calibrated method relies on: per-block arguments (masks, rotary tables of each attention
type), per-sample arguments (Gemma 4's per-layer inputs) and state carried between blocks (Gemma 4's
shared KV) must all be exactly what each block gets inside the model.
"""

import dataclasses

import pytest
import torch

from lowbit.arch import spec_for
from lowbit.calib.capture import capture_block_inputs
from lowbit.engine import BlockEngine
from lowbit.model.skeleton import attention_implementation, model_class
from tests.arch.tiny import TINY, tiny_config

N_SAMPLES, SEQLEN = 5, 24  # 24 tokens > the sliding window of 8: sliding and full masks differ


def real_model(arch):
    config = tiny_config(arch)
    torch.manual_seed(0)
    cls = model_class(config)
    model = cls._from_config(config, dtype=torch.float32, attn_implementation=attention_implementation(cls)).eval()
    with torch.no_grad():  # random non-trivial values for parameters initialised to constants (norms, scalars)
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and t.numel() > 0 and "inv_freq" not in name and ("norm" in name or "scalar" in name):
                t.copy_(t + 0.1 * torch.randn_like(t))
    return model


def full_forward_final_inputs(model, spec, windows):
    """What the final norm receives, one sample at a time: [1, T, H] per sample."""
    got = []
    hook = model.get_submodule(spec.post_block[0]).register_forward_hook(lambda m, args, out: got.append(args[0].clone()))
    with torch.no_grad():
        for w in windows:
            model(input_ids=w.unsqueeze(0), use_cache=False)
    hook.remove()
    return got


def replay(model, spec, windows, batch_size):
    blocks = model.get_submodule(spec.blocks)
    plan = capture_block_inputs(model, blocks, [{"input_ids": w.unsqueeze(0)} for w in windows], "cpu", "cpu", spec.state_kwargs)
    assert not plan.refusal, plan.refusal
    engine = BlockEngine(plan, "cpu", "cpu", batch_size)
    stream = engine.stream()
    for i, block in enumerate(blocks):
        stream = engine.propagate(block, i, stream)
    return plan, stream.hidden


@pytest.mark.parametrize("arch", sorted(TINY))
def test_block_by_block_matches_full_forward(arch):
    model = real_model(arch)
    spec = spec_for(model.config)
    torch.manual_seed(1)
    windows = torch.randint(3, 120, (N_SAMPLES, SEQLEN))
    want = full_forward_final_inputs(model, spec, windows)
    for batch_size in (1, 2, N_SAMPLES):
        plan, got = replay(model, spec, windows, batch_size)
        assert len(got) == N_SAMPLES
        for s, (g, w) in enumerate(zip(got, want)):
            # fp32 summation-order noise only (batched experts sum in another order: ~2e-5 seen on Gemma 4 MoE);
            # a wrong argument or state moves outputs by orders of magnitude more
            torch.testing.assert_close(g, w, rtol=5e-5, atol=5e-5, msg=lambda m: f"{arch} batch {batch_size} sample {s}: {m}")


def test_gemma4_per_layer_inputs_are_per_sample_and_masks_are_shared():
    """Gemma 4's positional per_layer_input differs per sample (kept per sample); the sliding-window mask
    is one object for every sliding layer (stored once)."""
    model = real_model("Gemma4ForCausalLM")
    spec = spec_for(model.config)
    windows = torch.randint(3, 120, (3, SEQLEN))
    plan = capture_block_inputs(model, model.get_submodule(spec.blocks), [{"input_ids": w.unsqueeze(0)} for w in windows], "cpu", "cpu", spec.state_kwargs)
    for args in plan.blocks:
        assert "per_layer_input" in args.sample and len(args.sample["per_layer_input"]) == 3
        assert "shared_kv_states" in args.state
    sliding = [i for i, t in enumerate(model.config.layer_types) if t == "sliding_attention"]
    assert plan.blocks[sliding[0]].const["attention_mask"] is plan.blocks[sliding[1]].const["attention_mask"]


def test_state_passed_between_blocks_without_a_spec_entry_is_refused():
    """Without `state_kwargs`, Gemma 4's shared KV cannot be replayed per sample: capture says so."""
    model = real_model("Gemma4ForCausalLM")
    spec = dataclasses.replace(spec_for(model.config), state_kwargs=())
    plan = capture_block_inputs(model, model.get_submodule(spec.blocks), [{"input_ids": torch.randint(3, 120, (1, SEQLEN))}], "cpu", "cpu", ())
    assert "shared_kv_states" in plan.refusal and "state_kwargs" in plan.refusal
