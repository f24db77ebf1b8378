"""The whole pipeline on a tiny random Llama: quantize -> export -> load, against an independent reference."""

import json

import pytest
import torch
from safetensors import safe_open

import lowbit
from lowbit.export.auto_round import layer_tensors
from tests.conftest import dying_on
from tests.reference import reference_rtn, reference_rtn_model


def quantize_tiny(src, out, scheme, **run):
    return lowbit.quantize(str(src), "rtn", scheme, run=lowbit.RunConfig(output_dir=str(out), device="cpu", **run), progress=False)


@pytest.mark.parametrize("bits,group_size,sym", [(4, 128, False), (4, 64, True), (3, 128, False), (2, 32, False), (8, -1, True)])
def test_loaded_logits_match_reference_rtn(tiny_llama, tmp_path, bits, group_size, sym):
    src, fp_model = tiny_llama
    out = tmp_path / "q"
    summary = quantize_tiny(src, out, lowbit.Scheme(bits, group_size, sym))
    assert len(summary.quantized) == 2 * 7
    model = lowbit.load(out)
    x = torch.randint(0, 512, (2, 24))
    want = reference_rtn_model(fp_model, bits, group_size, sym)(x).logits
    got = model(x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_export_layout_and_config(tiny_llama, tmp_path):
    src, _ = tiny_llama
    out = tmp_path / "q"
    quantize_tiny(src, out, lowbit.Scheme(4, 128, False))
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "auto-round" and qc["packing_format"] == "auto_round"
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["block_name_to_quantize"]) == (4, 128, False, "model.layers")
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        q = f.get_tensor("model.layers.0.mlp.down_proj.qweight")  # down: K=512 in, N=256 out
        z = f.get_tensor("model.layers.0.mlp.down_proj.qzeros")
        s = f.get_tensor("model.layers.0.mlp.down_proj.scales")
    assert (q.dtype, tuple(q.shape)) == (torch.int32, (512 * 4 // 32, 256))
    assert (z.dtype, tuple(z.shape)) == (torch.int32, (4, 256 * 4 // 32))
    assert (s.dtype, tuple(s.shape)) == (torch.float16, (4, 256))
    assert "model.layers.0.mlp.down_proj.weight" not in names and "model.layers.0.mlp.down_proj.g_idx" not in names
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names and "model.norm.weight" in names
    assert not list(tmp_path.glob("*.lowbit-partial"))


def test_symmetric_export_stores_zero_minus_one(tiny_llama, tmp_path):
    src, _ = tiny_llama
    out = tmp_path / "q"
    quantize_tiny(src, out, lowbit.Scheme(4, 128, True))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["packing_format"] == "auto_round:auto_gptq"
    with safe_open(out / "model.safetensors", "pt") as f:
        z = f.get_tensor("model.layers.1.self_attn.q_proj.qzeros")
    assert torch.all(z == 0x77777777)  # zero 8 stored as 7 in every nibble


def test_tied_lm_head_quantized_on_request(tmp_path):
    from tests.conftest import save_tiny_llama

    src = tmp_path / "tied"
    fp_model = save_tiny_llama(src, tie=True)
    out = tmp_path / "q"
    summary = quantize_tiny(src, out, lowbit.Scheme(4, 128, False), quant_lm_head=True)
    assert "lm_head" in summary.quantized
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    model = lowbit.load(out)
    assert type(model.lm_head).__name__ == "QuantLinear"
    assert model.get_input_embeddings().weight.dtype == torch.float32
    embedding = fp_model.get_input_embeddings().weight.detach()
    assert torch.equal(model.get_input_embeddings().weight, embedding)  # untied: the embedding stays full precision
    torch.testing.assert_close(model.lm_head.dequantize_weight(torch.float32).double(), reference_rtn(embedding, 4, 128, False), rtol=0, atol=1e-6)


def test_resume_after_a_crash_gives_the_same_output(tiny_llama, tmp_path, monkeypatch):
    import lowbit.runner as runner

    src, _ = tiny_llama
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    quantize_tiny(src, clean, lowbit.Scheme(4, 128, False), max_shard_bytes=1)
    real = runner.block_tensors
    monkeypatch.setattr(runner, "block_tensors", dying_on(real, 2))  # dies writing block 1
    with pytest.raises(RuntimeError, match="simulated crash"):
        quantize_tiny(src, crashed, lowbit.Scheme(4, 128, False), max_shard_bytes=1)
    assert not crashed.exists() and (tmp_path / "crashed.lowbit-partial").is_dir()
    monkeypatch.setattr(runner, "block_tensors", real)
    quantize_tiny(src, crashed, lowbit.Scheme(4, 128, False), max_shard_bytes=1)
    assert crashed.is_dir() and not (tmp_path / "crashed.lowbit-partial").exists()
    a, b = lowbit.load(clean), lowbit.load(crashed)
    for (name, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(ta, tb), name


def test_layer_tensors_pack_what_quantize_produced():
    w = torch.randn(64, 96)
    result = lowbit.quant.quantize_weight(w, lowbit.Scheme(4, 32, False))
    t = layer_tensors("x", result)
    from lowbit.kernels import QuantLinear

    layer = QuantLinear(96, 64, 4, 32)
    layer.load_state_dict({"qweight": t["x.qweight"], "qzeros": t["x.qzeros"], "scales": t["x.scales"]})
    torch.testing.assert_close(layer.dequantize_weight(torch.float32).double(), reference_rtn(w, 4, 32, False), rtol=0, atol=1e-6)


def test_cpu_dequantized_cache_gives_identical_outputs(tiny_llama, tmp_path):
    """The first call fills the cache, the second is served from it; both equal the uncached path exactly and
    match the independent reference RTN."""
    src, fp_model = tiny_llama
    out = tmp_path / "q"
    quantize_tiny(src, out, lowbit.Scheme(4, 64, False))
    x = torch.randint(0, 512, (1, 16))
    cached, plain = lowbit.load(out), lowbit.load(out, cpu_cache_dequantized=False)
    layer = cached.model.layers[0].mlp.up_proj
    assert layer.cache_dequantized and not plain.model.layers[0].mlp.up_proj.cache_dequantized
    assert layer._dequantized is None
    filling = cached(x).logits
    assert layer._dequantized is not None  # filled by the first call
    served = cached(x).logits
    uncached = plain(x).logits
    assert plain.model.layers[0].mlp.up_proj._dequantized is None
    assert torch.equal(filling, uncached) and torch.equal(served, uncached)
    torch.testing.assert_close(served, reference_rtn_model(fp_model, 4, 64, False)(x).logits, rtol=1e-4, atol=1e-4)


def test_calibrated_resume_replays_finished_blocks(tmp_path, monkeypatch):
    """AWQ changes norms as well as linears: a resumed run must feed later blocks what was written."""
    import lowbit.runner as runner
    from tests.conftest import save_tiny_model_with_tokenizer

    text = " ".join(f"The {w} walked to the {v} and said {n} words." for w, v, n in zip(["cat", "dog", "man", "girl"] * 60, ["shop", "park", "sea"] * 80, range(240)))
    (tmp_path / "calib.txt").write_text(text)
    src = tmp_path / "tiny"
    save_tiny_model_with_tokenizer(src, text)
    calib = lowbit.CalibConfig(dataset=str(tmp_path / "calib.txt"), nsamples=4, seqlen=64, batch_size=2)

    def run(out):
        return lowbit.quantize(str(src), lowbit.AwqConfig(n_grid=4), lowbit.Scheme(4, 64, False), calib=calib, run=lowbit.RunConfig(output_dir=str(out), device="cpu", max_shard_bytes=1), progress=False)

    run(tmp_path / "clean")
    real = runner.block_tensors
    monkeypatch.setattr(runner, "block_tensors", dying_on(real, 2))  # dies writing block 1
    with pytest.raises(RuntimeError):
        run(tmp_path / "resumed")
    monkeypatch.setattr(runner, "block_tensors", real)
    run(tmp_path / "resumed")
    a, b = lowbit.load(tmp_path / "clean"), lowbit.load(tmp_path / "resumed")
    for (name, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(ta, tb), name


def test_a_diverged_block_is_logged_as_strict_json(tmp_path, monkeypatch):
    """AutoRound whose every loss is NaN (a diverged block): the run ends, warns, and lowbit_log.json stays JSON that
    a strict reader parses (Python's json writes NaN by default, which JSON has no spelling for), the losses as null."""
    from lowbit.algorithms import autoround as ar
    from tests.conftest import save_tiny_model_with_tokenizer

    text = "the old man walked to the garden and wrote a letter to his young daughter near the house. " * 40
    src = tmp_path / "tiny"
    save_tiny_model_with_tokenizer(src, text)
    (tmp_path / "calib.txt").write_text(text)
    monkeypatch.setattr(ar, "block_loss", lambda pred, target: ((pred.float() - target.float()) ** 2).mean() * float("nan"))
    out = tmp_path / "q"
    with pytest.warns(UserWarning, match="not finite"):
        lowbit.quantize(str(src), lowbit.AutoRoundConfig(iters=2, compile=False), lowbit.Scheme(4, 32, True),
                        lowbit.CalibConfig(dataset=str(tmp_path / "calib.txt"), nsamples=2, seqlen=16, batch_size=2),
                        lowbit.RunConfig(output_dir=str(out), device="cpu"), progress=False)

    def refuse(constant):
        raise ValueError(f"{constant} in lowbit_log.json")

    log = json.loads((out / "lowbit_log.json").read_text(), parse_constant=refuse)
    assert [entry[0] for entry in log["block_losses"]] == [0, 1]
    assert all(v is None for entry in log["block_losses"] for v in entry[1:]), log["block_losses"]
