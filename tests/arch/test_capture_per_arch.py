"""For every registered architecture: captured block inputs, run block by block, reproduce the full model.

This is what a calibrated method relies on: the per-block kwargs recorded at capture (masks, rotary
tables, per-layer-type inputs such as Gemma 3's sliding vs full attention) must be exactly what each block
gets inside the model's own forward.
"""

import pytest
import torch

from lowbit.arch import spec_for
from lowbit.calib.capture import capture_block_inputs, run_block
from tests.arch.test_specs import TINY_CONFIGS, tiny_config


def real_model(arch):
    from lowbit.model.skeleton import model_class

    config = tiny_config(arch)
    config.sliding_window = 8 if hasattr(config, "sliding_window") else None
    torch.manual_seed(0)
    return model_class(config)._from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_block_by_block_matches_full_forward(arch):
    model = real_model(arch)
    spec = spec_for(model.config)
    blocks = model.get_submodule(spec.blocks)
    windows = torch.randint(0, 128, (3, 24))  # 24 tokens > the sliding window of 8: the masks differ

    final_inputs = []
    hook = model.get_submodule(spec.post_block[0]).register_forward_hook(lambda m, args, out: final_inputs.append(args[0]))
    with torch.no_grad():
        for w in windows:
            model(input_ids=w.unsqueeze(0), use_cache=False)
    hook.remove()

    cache = capture_block_inputs(model, blocks, windows, "cpu", "cpu")
    assert len(cache.hidden) == 3 and len(cache.kwargs) == len(blocks)
    hidden = cache.hidden
    for i, block in enumerate(blocks):
        hidden = run_block(block, hidden, cache.kwargs_for(i, "cpu"), batch_size=2, device="cpu", storage="cpu")
    for got, want in zip(hidden, final_inputs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
