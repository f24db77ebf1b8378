"""Every registered spec resolved against a tiny from_config model: paths exist, linears all covered."""

import pytest
import torch
from transformers import AutoConfig

from lowbit.arch import registered_architectures, spec_for
from lowbit.errors import LowbitError
from lowbit.model.skeleton import build_skeleton

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128, head_dim=16)
TINY_CONFIGS = {
    "LlamaForCausalLM": ("llama", {}),
    "MistralForCausalLM": ("mistral", {}),
    "Qwen2ForCausalLM": ("qwen2", {}),
    "Qwen3ForCausalLM": ("qwen3", {}),
    "Gemma3ForCausalLM": ("gemma3_text", {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}),
    "Phi3ForCausalLM": ("phi3", {"pad_token_id": 0}),
}


def tiny_config(arch):
    model_type, extra = TINY_CONFIGS[arch]
    return AutoConfig.for_model(model_type, architectures=[arch], **{**SMALL, **extra})


def test_every_registered_architecture_has_a_tiny_config():
    assert set(registered_architectures()) <= set(TINY_CONFIGS), "add a tiny config for each new spec"


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_spec_resolves_and_covers_every_linear(arch):
    config = tiny_config(arch)
    spec = spec_for(config)
    model = build_skeleton(config)
    blocks = model.get_submodule(spec.blocks)
    assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) == 2
    for path in (spec.embed, *spec.pre_block, *spec.post_block, spec.lm_head):
        model.get_submodule(path)  # raises on a missing path
    for block in blocks:
        found = {name for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        assert found == set(spec.linears), f"{arch}: block linears {sorted(found)} vs spec {sorted(spec.linears)}"
        for group in spec.scale_groups:
            block.get_submodule(group.prev)
            for name in group.linears:
                assert name in spec.linears
    outside = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.startswith(spec.blocks + ".")}
    assert outside <= {spec.lm_head}, f"{arch}: linears outside the blocks not covered: {outside}"


def test_unknown_architecture_names_itself_and_the_fix():
    config = AutoConfig.for_model("gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(LowbitError) as err:
        spec_for(config)
    message = str(err.value)
    assert "GPT2LMHeadModel" in message and "ArchSpec" in message and "\n" not in message
