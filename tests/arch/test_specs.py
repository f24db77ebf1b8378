"""Every registered spec resolved against a tiny from_config model: paths exist, every linear is covered,
nothing outside the blocks is quantized except on request."""

import dataclasses

import pytest
import torch
from transformers import AutoConfig

from lowbit.arch import registered_architectures, spec_for
from lowbit.errors import LowbitError
from lowbit.model.skeleton import build_skeleton
from tests.arch.tiny import TINY, tiny_config


def test_every_registered_architecture_has_a_tiny_config():
    assert set(registered_architectures()) <= set(TINY), "add a tiny config for each new spec in tests/arch/tiny.py"


@pytest.mark.parametrize("arch", sorted(TINY))
def test_spec_resolves_and_covers_every_linear(arch):
    config = tiny_config(arch)
    spec = spec_for(config)
    model = build_skeleton(config)
    blocks = model.get_submodule(spec.blocks)
    assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) >= 2
    for path in (spec.embed, *spec.post_block, spec.lm_head):
        model.get_submodule(path)  # raises on a missing path
    for i, block in enumerate(blocks):
        quantize, fp = spec.block_linears(block, f"{spec.blocks}.{i}")  # raises on an uncovered linear
        found = {n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        assert set(quantize) | set(fp) == found and quantize
        present = [g for g in spec.scale_groups if g.prev in dict(block.named_modules())]
        assert present, f"{arch}: no AWQ scale group resolves in block {i}"
    outside = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not spec.in_blocks(n)}
    assert all(n == spec.lm_head or spec.is_kept_fp(n) for n in outside), f"{arch}: linears outside the blocks not kept: {outside}"
    if config.architectures[0].endswith("ForConditionalGeneration"):
        tower = [n for n in outside if "vision" in n or "visual" in n]
        assert tower and all(spec.is_kept_fp(n) for n in tower)


def test_gemma4_kv_reuse_layers_have_no_kv_projections_and_are_still_covered():
    """The linears differ by layer: the spec's patterns follow each layer's own modules."""
    config = tiny_config("Gemma4ForCausalLM")
    spec = spec_for(config)
    blocks = build_skeleton(config).get_submodule(spec.blocks)
    names = [set(spec.block_linears(b, f"b{i}")[0]) for i, b in enumerate(blocks)]
    first_shared = config.num_hidden_layers - config.num_kv_shared_layers
    assert "self_attn.k_proj" in names[0] and "self_attn.k_proj" not in names[first_shared]
    assert "per_layer_input_gate" in names[first_shared]


def test_a_linear_the_spec_does_not_know_is_an_error_naming_it():
    config = tiny_config("LlamaForCausalLM")
    spec = dataclasses.replace(spec_for(config), linears=("self_attn.*",))
    block = build_skeleton(config).get_submodule(spec.blocks)[0]
    with pytest.raises(LowbitError, match="model.layers.0.mlp.gate_proj matches no pattern"):
        spec.block_linears(block, "model.layers.0")


def test_unknown_architecture_names_itself_and_the_fix():
    config = AutoConfig.for_model("gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(LowbitError) as err:
        spec_for(config)
    message = str(err.value)
    assert "GPT2LMHeadModel" in message and "ArchSpec" in message and "\n" not in message
