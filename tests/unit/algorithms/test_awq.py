"""AWQ on tiny random blocks: exact folding, the gain on an outlier channel, replay, fallback, end to end."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import lowbit
from tests.conftest import save_tiny_model_with_tokenizer
from lowbit.algorithms.rtn import quantize_block as rtn_block
from lowbit.algorithms.awq import (
    GroupScale,
    apply,
    apply_scales,
    candidate_scales,
    inspected_module,
    quantize_block,
    search,
    usable_groups,
)
from lowbit.arch import spec_for
from tests.engine_helpers import block_outputs
from tests.engine_helpers import capture as capture_windows
from tests.engine_helpers import make_ctx as engine_ctx
from lowbit.config import AwqConfig, Scheme
from lowbit.errors import LowbitError

OUTLIER = 7  # hidden channel made an outlier in the "outlier" models


def tiny_llama(heads=4, kv_heads=2, outlier=False):
    """Tiny random Llama; with `outlier`, channel OUTLIER of both norms' outputs is 30x the others, as in
    real LLMs, and the weights that read it are small (the channel carries much of the signal)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
        vocab_size=256, max_position_embeddings=128, architectures=["LlamaForCausalLM"],
    )
    model = LlamaForCausalLM(cfg).eval()
    if outlier:
        with torch.no_grad():
            for layer in model.model.layers:
                for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                    norm.weight[OUTLIER] = 30.0
    return model


def capture(model):
    windows = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    return capture_windows(model, windows)


def make_ctx(model, inputs, scheme, spec=None, log=None):
    return engine_ctx(model, inputs, scheme, spec=spec, log=log)


def block_out(block, inputs):
    """Outputs of `block` (standing in for block 0) on the cached inputs, [n, T, H]."""
    with torch.no_grad():
        return torch.cat([inputs.engine.call(block, 0, inputs.stream, idx) for idx in inputs.engine.batches(len(inputs.stream.hidden))])


def quantized_mse(ctx, results, fp) -> float:
    for n, r in results.items():
        ctx.linears[n].weight.data = r.dequantize()
    return F.mse_loss(block_outputs(ctx), fp).item()


def test_groups_and_inspected_modules():
    assert inspected_module(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")) == "self_attn"
    assert inspected_module(("mlp.gate_proj", "mlp.up_proj")) == "mlp"
    assert inspected_module(("mlp.down_proj",)) == "mlp.down_proj"
    gqa, mha = tiny_llama(), tiny_llama(kv_heads=4)
    prevs = lambda m: [g.prev for g in usable_groups(make_ctx(m, capture(m), Scheme()))]  # noqa: E731
    assert prevs(gqa) == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]  # v -> o: 32 outputs vs 64 inputs
    assert prevs(mha) == ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"]


def test_candidates_start_with_identity_and_are_normalized():
    x = torch.rand(16) + 0.1
    for w in (None, torch.rand(16) + 0.1):
        cands = candidate_scales(x, w, 20)
        assert torch.equal(cands[0][1], torch.ones(16))
        assert len(cands) == (20 if w is None else 21)
        for _, s in cands[1:]:
            assert torch.allclose(s.max() * s.min(), torch.tensor(1.0), rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])  # 4: includes the v -> o fold
def test_folding_leaves_the_fp_block_unchanged(kv_heads):
    model = tiny_llama(kv_heads=kv_heads, outlier=True)
    inputs = capture(model)
    fp = block_out(model.model.layers[0], inputs)
    ctx = make_ctx(model, inputs, Scheme())
    g = torch.Generator().manual_seed(3)
    scales = [GroupScale(gr.prev, gr.linears, torch.rand(ctx.block.get_submodule(gr.linears[0]).in_features, generator=g) * 4 + 0.1) for gr in usable_groups(ctx)]
    before = copy.deepcopy(ctx.block.state_dict())
    apply_scales(ctx.block, scales)
    changed = {n for n, t in ctx.block.state_dict().items() if not torch.equal(t, before[n])}
    folded = {n for n in ctx.linears if kv_heads == 4 or n != "self_attn.o_proj"}  # GQA: o_proj cannot fold
    assert changed == {f"{n}.weight" for n in ("input_layernorm", "post_attention_layernorm", *folded)}
    torch.testing.assert_close(block_out(ctx.block, inputs), fp, rtol=1e-4, atol=1e-5)


def test_folding_into_a_gemma_norm_uses_the_offset():
    """Gemma 3's RMSNorm computes x_hat * (1 + weight): the spec's norm_weight_offset makes the fold exact."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "gemma3_text", architectures=["Gemma3ForCausalLM"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=128, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random, nonzero norm weights so that (1 + w) / s - 1 differs from w / s
        for p in model.model.layers[0].parameters():
            if p.ndim == 1:
                p.normal_(0, 0.5)
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    inputs = capture_windows(model, windows)
    spec = spec_for(config)
    assert spec.norm_weight_offset == 1.0
    block = model.model.layers[0]
    fp = block_out(block, inputs)
    s = torch.rand(64, generator=torch.Generator().manual_seed(2)) + 0.5
    groups = [GroupScale("input_layernorm", spec.scale_groups[0].linears, s), GroupScale("pre_feedforward_layernorm", spec.scale_groups[2].linears, s.flip(0))]
    wrong = copy.deepcopy(block)
    apply_scales(block, groups, spec.norm_weight_offset)
    torch.testing.assert_close(block_out(block, inputs), fp, rtol=1e-4, atol=1e-5)
    apply_scales(wrong, groups, 0.0)  # folding as if weight were the multiplier changes the function
    assert not torch.allclose(block_out(wrong, inputs), fp, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("config", [AwqConfig(), AwqConfig(duo_scaling=False, apply_clip=False), AwqConfig(search_samples=4)])
def test_beats_rtn_on_an_outlier_channel(config):
    model = tiny_llama(outlier=True)
    inputs = capture(model)
    scheme = Scheme(3, 32, sym=False)
    fp = block_out(model.model.layers[0], inputs)
    rtn_ctx = make_ctx(copy.deepcopy(model), inputs, scheme)
    rtn = quantized_mse(rtn_ctx, rtn_block(rtn_ctx, None), fp)
    ctx = make_ctx(copy.deepcopy(model), inputs, scheme)
    results = quantize_block(ctx, config)
    assert set(results) == set(ctx.linears)
    assert quantized_mse(ctx, results, fp) < 0.7 * rtn  # the block's own output error, against RTN's


def test_search_replays_to_identical_weights():
    model = tiny_llama(kv_heads=4, outlier=True)
    inputs = capture(model)
    scheme = Scheme(4, 32, sym=False)
    fresh = copy.deepcopy(model.model.layers[0])
    ctx = make_ctx(model, inputs, scheme)
    result, _, _ = search(ctx, AwqConfig(n_grid=10))
    assert len(result.scales) == 4 and set(result.clips) == set(ctx.linears)
    assert all(s.scale.device.type == "cpu" and s.scale.dtype == torch.float32 for s in result.scales)
    apply(fresh, result, ctx.schemes, ctx.spec.norm_weight_offset)
    searched = ctx.block.state_dict()
    for name, t in fresh.state_dict().items():
        assert torch.equal(t, searched[name]), name
    assert not torch.equal(fresh.input_layernorm.weight, model.model.layers[1].input_layernorm.weight)


def test_no_scale_groups_errors_when_explicit_and_falls_back_otherwise():
    import dataclasses

    model = tiny_llama()
    inputs = capture(model)
    spec = dataclasses.replace(spec_for(model.config), scale_groups=())
    with pytest.raises(LowbitError, match="scale groups"):
        quantize_block(make_ctx(model, inputs, Scheme(), spec), AwqConfig())
    lines = []
    ctx = make_ctx(model, inputs, Scheme(), spec, log=lines.append)
    results = quantize_block(ctx, AwqConfig(explicit=False))
    rtn = rtn_block(make_ctx(model, inputs, Scheme()), None)
    assert len(lines) == 1 and "falling back to RTN" in lines[0]
    for n, r in results.items():
        assert torch.equal(r.codes, rtn[n].codes)


# ---------------------------------------------------------------- end to end


def test_quantize_and_load_tiny_model(tmp_path):
    from transformers import AutoModelForCausalLM

    text = " ".join(f"The {w} walked to the {v} and said {n} words." for w, v, n in zip(["cat", "dog", "man", "girl"] * 60, ["shop", "park", "sea"] * 80, range(240)))
    (tmp_path / "calib.txt").write_text(text)
    src = tmp_path / "tiny"
    save_tiny_model_with_tokenizer(src, text)
    out = tmp_path / "q"
    calib = lowbit.CalibConfig(dataset=str(tmp_path / "calib.txt"), nsamples=4, seqlen=64, batch_size=2)
    summary = lowbit.quantize(str(src), lowbit.AwqConfig(), lowbit.Scheme(4, 64, False), calib=calib, run=lowbit.RunConfig(output_dir=str(out), device="cpu"), progress=False)
    assert summary.method == "awq" and len(summary.quantized) == 2 * 7
    model = lowbit.load(out)
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    # the scales were folded into the norms that were written out
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, fp.model.layers[0].input_layernorm.weight)
    x = torch.randint(0, 400, (1, 32))
    got, want = model(x).logits, fp(x).logits
    assert torch.isfinite(got).all()
    assert (got - want).norm() / want.norm() < 0.2
