"""The block engine's contract for diffusion transformers (FLUX double + single-stream blocks, SD3 joint
blocks with a dual-attention layer and a last block that drops the text stream): block inputs captured from
the transformer's own calls, replayed block by block with both streams carried, reproduce the transformer's
forward for every sample, at batch sizes 1, 2 and n. Samples differ in timestep, guidance, prompt embeddings
and latents, as the calls of a denoising loop do; a batched call is split into its samples."""

import pytest
import torch

from lowbit.diffusion.capture import block_lists, capture_transformer
from lowbit.diffusion.spec import diffusion_spec
from lowbit.engine import BlockEngine
from tests.diffusion_tiny import tiny_transformer

N = 5


def flux_inputs(gen, batch):
    tokens, text = 16, 8
    ids = torch.zeros(tokens, 3)
    ids[:, 1], ids[:, 2] = torch.arange(tokens) // 4, torch.arange(tokens) % 4
    return dict(hidden_states=torch.randn(batch, tokens, 16, generator=gen), encoder_hidden_states=torch.randn(batch, text, 32, generator=gen),
                pooled_projections=torch.randn(batch, 32, generator=gen), timestep=torch.rand(batch, generator=gen),
                guidance=torch.full((batch,), 3.5) + torch.rand(batch, generator=gen), img_ids=ids, txt_ids=torch.zeros(text, 3))


def sd3_inputs(gen, batch):
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=gen), encoder_hidden_states=torch.randn(batch, 8, 32, generator=gen),
                pooled_projections=torch.randn(batch, 32, generator=gen), timestep=torch.rand(batch, generator=gen) * 1000)


INPUTS = {"flux": flux_inputs, "sd3": sd3_inputs}


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_diffusion_blocks_replay_the_transformer_forward(kind):
    model = tiny_transformer(kind)
    spec = diffusion_spec(type(model).__name__)
    gen = torch.Generator().manual_seed(1)
    calls = [INPUTS[kind](gen, 2), INPUTS[kind](gen, 3)]  # two batched calls: 5 samples
    want = []  # the input of norm_out (the last block's image tokens), per sample, from the unsplit forward
    hook = model.norm_out.register_forward_hook(lambda m, args, out: want.extend(args[0].split(1)))
    with torch.no_grad():
        for inputs in calls:
            model(**inputs)
    hook.remove()

    plan = capture_transformer(model, spec, lambda t: [t(**inputs) for inputs in calls], "cpu")
    assert not plan.refusal, plan.refusal
    assert len(plan.hidden) == N and len(plan.streams["encoder_hidden_states"]) == N
    assert all("temb" in args.sample for args in plan.blocks)  # per timestep / prompt
    blocks = [b for blocks in block_lists(model, spec) for b in blocks]
    for batch_size in (1, 2, N):
        engine = BlockEngine(plan, "cpu", "cpu", batch_size)
        stream = engine.stream()
        for i, block in enumerate(blocks):
            stream = engine.propagate(block, i, stream)
        for s, (got, w) in enumerate(zip(stream.hidden, want)):
            torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"{kind} batch {batch_size} sample {s}: {m}")
