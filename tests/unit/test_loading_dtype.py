"""`lowbit.load(..., dtype=float16)` leaves the buffers a model computes itself as transformers' own loader does:
Llama-3's rotary frequencies (theta 500000) stay float32 and equal to the float64 formula, where a cast to fp16
would turn the smallest ones into subnormals (relative error up to ~1e-2)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lowbit


def test_fp16_load_keeps_rotary_frequencies_as_transformers(tmp_path):
    config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, rope_theta=500000.0, max_position_embeddings=512)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "fp")
    lowbit.quantize(str(tmp_path / "fp"), "rtn", lowbit.Scheme(4, 32, False), run=lowbit.RunConfig(output_dir=str(tmp_path / "q"), device="cpu"),
                    progress=False)

    ours = lowbit.load(tmp_path / "q", dtype=torch.float16).model.rotary_emb.inv_freq
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", dtype=torch.float16).model.rotary_emb.inv_freq
    dim = 256 // 2  # head_dim
    reference = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))

    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs)
    assert torch.allclose(ours.double(), reference, rtol=1e-6, atol=0)
    assert reference.min() < 2**-14  # the case this guards: below fp16's smallest normal
