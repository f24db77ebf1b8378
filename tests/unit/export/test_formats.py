"""Each export format's exact tensors, pinned by hand-computed words and shapes and decoded by tests/reference.py
(written from the formats' definitions, not lowbit's readers); each config as its peer's schema parses it; refusals."""

import json

import pytest
import torch

import lowbit
from lowbit.config import Scheme
from lowbit.errors import LowbitError
from lowbit.export import auto_awq, auto_gptq, auto_round, compressed_tensors
from lowbit.quant import QuantResult, quantize_weight
from tests.reference import dequantize_written, reference_rtn, reference_rtn_model


def result_with_codes(codes: torch.Tensor, bits=4, group_size=8, sym=False) -> QuantResult:
    n, k = codes.shape
    g = -(-k // group_size)
    zero = torch.full((n, g), 3, dtype=torch.uint8) if not sym else torch.full((n, g), 2 ** (bits - 1), dtype=torch.uint8)
    return QuantResult(Scheme(bits, group_size, sym), codes.to(torch.uint8), torch.full((n, g), 0.5), zero)


def test_awq_packs_eight_columns_in_interleaved_order():
    # one input row (K=8 so one group), eight output columns with codes 1..8
    codes = torch.arange(1, 9).reshape(8, 1).repeat(1, 8)  # [N=8, K=8]: column n has code n+1 everywhere
    t = auto_awq.layer_tensors("x", result_with_codes(codes))
    q = t["x.qweight"]
    assert q.shape == (8, 1) and q.dtype == torch.int32
    # nibble i holds column ORDER[i] = 0,2,4,6,1,3,5,7 -> codes 1,3,5,7,2,4,6,8
    assert q[0, 0].item() == 0x86427531 - 2**32
    assert t["x.qzeros"].shape == (1, 1) and t["x.qzeros"][0, 0].item() == 0x33333333
    assert t["x.scales"].shape == (1, 8) and t["x.scales"].dtype == torch.float16


def test_gptq_adds_g_idx_and_stores_zero_minus_one():
    w = torch.randn(64, 96)
    t = auto_gptq.layer_tensors("x", quantize_weight(w, Scheme(4, 32, True)))
    assert torch.equal(t["x.g_idx"], torch.arange(96, dtype=torch.int32) // 32)
    assert torch.all(t["x.qzeros"] == 0x77777777)
    assert t["x.qweight"].shape == (96 * 4 // 32, 64)


def test_compressed_tensors_layout():
    codes = torch.arange(16).repeat(3, 2)  # [N=3, K=32]
    r = result_with_codes(codes, group_size=16)
    t = compressed_tensors.layer_tensors("x", r)
    assert t["x.weight_packed"].shape == (3, 4)  # K=32 4-bit values -> 4 words per row
    assert t["x.weight_packed"][0, 0].item() == 0x76543210  # low nibble first, value = unsigned code
    assert t["x.weight_zero_point"].shape == (1, 2)  # N=3 zeros packed along N into one word
    assert t["x.weight_zero_point"][0, 0].item() == 0x333
    assert t["x.weight_scale"].shape == (3, 2) and torch.equal(t["x.weight_shape"], torch.tensor([3, 32]))
    sym = compressed_tensors.layer_tensors("x", result_with_codes(codes, group_size=16, sym=True))
    assert "x.weight_zero_point" not in sym


@pytest.mark.parametrize("fmt,bits,group_size,sym,n", [
    (auto_round, 4, 32, False, 64), (auto_round, 3, 32, True, 64), (auto_round, 2, 64, False, 64), (auto_round, 8, -1, True, 64),
    (auto_gptq, 4, 32, True, 64), (auto_gptq, 3, 96, True, 64), (auto_gptq, 8, 32, True, 64),
    (auto_awq, 4, 32, False, 64), (auto_awq, 4, 96, False, 64), (auto_awq, 4, 32, False, 40),
    (compressed_tensors, 4, 32, False, 64), (compressed_tensors, 4, 32, True, 64), (compressed_tensors, 3, 32, False, 64),
    (compressed_tensors, 8, -1, False, 64), (compressed_tensors, 3, 32, False, 40),  # N=40: zero points padded to whole words
])
def test_written_words_decode_to_reference_rtn(fmt, bits, group_size, sym, n):
    """quantize -> layer_tensors, read back by tests/reference.py's decoders (written from each format's
    definition), equals tests/reference.py's RTN weight."""
    torch.manual_seed(bits * 100 + (group_size % 97))
    k = 96
    w = torch.randn(n, k)
    t = fmt.layer_tensors("x", quantize_weight(w, Scheme(bits, group_size, sym)))
    got = dequantize_written(fmt.NAME, t.__getitem__, "x", bits, group_size, sym)
    torch.testing.assert_close(got.double(), reference_rtn(w, bits, group_size, sym), rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt,scheme,needle", [
    (auto_awq, Scheme(3, 128, False), "only 4-bit"),
    (auto_awq, Scheme(4, 128, True), "only asymmetric"),
    (auto_awq, Scheme(4, 128, False), "576 % 128 = 64"),
    (compressed_tensors, Scheme(4, 128, False), "576 % 128 = 64"),
    (auto_gptq, Scheme(4, 128, False), "asymmetric"),
])
def test_refusals_name_a_format_that_can(fmt, scheme, needle):
    reason = fmt.refuse(scheme, {576, 1536})
    assert needle in reason and "auto_round" in reason
    assert auto_round.refuse(scheme, {576, 1536}) is None


def test_refusal_happens_before_any_output(tmp_path):
    from tests.conftest import save_tiny_llama

    src = tmp_path / "m"
    save_tiny_llama(src, hidden=96, intermediate=192, heads=2, kv_heads=1, layers=1)
    with pytest.raises(LowbitError, match="auto_awq needs group_size to divide"):
        lowbit.quantize(str(src), "rtn", Scheme(4, 64, False), run=lowbit.RunConfig(output_dir=str(tmp_path / "o"), formats=("auto_awq",), device="cpu"), progress=False)
    assert not list(tmp_path.glob("o*"))


def peer_config(folder):
    """config.json's quantization_config as transformers parses it for its peer loader (AutoQuantizationConfig)."""
    from transformers.quantizers.auto import AutoQuantizationConfig

    return AutoQuantizationConfig.from_dict(json.loads((folder / "config.json").read_text())["quantization_config"])


def test_several_formats_write_side_by_side_and_each_loads_to_reference_rtn(tiny_llama, tmp_path):
    src, fp_model = tiny_llama
    out = tmp_path / "q"
    lowbit.quantize(str(src), "rtn", Scheme(4, 64, False), run=lowbit.RunConfig(output_dir=str(out), formats=("auto_round", "auto_awq", "compressed-tensors"), device="cpu"), progress=False)
    x = torch.randint(0, 512, (1, 16))
    want = reference_rtn_model(fp_model, 4, 64, False)(x).logits
    for f in ("auto_round", "auto_awq", "compressed-tensors"):
        torch.testing.assert_close(lowbit.load(out / f)(x).logits, want, rtol=1e-4, atol=1e-4, msg=f)
    awq = peer_config(out / "auto_awq")
    assert (type(awq).__name__, awq.bits, awq.group_size, awq.zero_point, awq.format) == ("AwqConfig", 4, 64, True, "gemm")
    ar = peer_config(out / "auto_round")
    assert (type(ar).__name__, ar.bits, ar.group_size, ar.sym, ar.packing_format) == ("AutoRoundConfig", 4, 64, False, "auto_round")
    assert (out / "auto_round" / "tokenizer_config.json").exists() or not list(src.glob("tokenizer*"))


def test_compressed_tensors_config_validates_against_its_schema(tiny_llama, tmp_path):
    """The config as compressed-tensors' own pydantic model (what vLLM and llm-compressor read) sees it."""
    from compressed_tensors import QuantizationConfig

    src, _ = tiny_llama
    out = tmp_path / "q"
    lowbit.quantize(str(src), "rtn", Scheme(4, -1, False), run=lowbit.RunConfig(output_dir=str(out), formats=("compressed-tensors",), device="cpu"), progress=False)
    qc = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    weights = qc.config_groups["group_0"].weights
    assert (qc.format, qc.quantization_status.value, qc.ignore) == ("pack-quantized", "compressed", ["lm_head"])
    assert (weights.num_bits, weights.type, weights.symmetric, weights.strategy, weights.group_size) == (4, "int", False, "channel", None)
    assert qc.config_groups["group_0"].targets == ["Linear"]


def test_gptq_config_and_quantize_config_as_transformers_reads_them(tiny_llama, tmp_path):
    from transformers.utils.quantization_config import GPTQConfig

    src, _ = tiny_llama
    out = tmp_path / "q"
    lowbit.quantize(str(src), "rtn", Scheme(4, 128, True), run=lowbit.RunConfig(output_dir=str(out), formats=("auto_gptq",), device="cpu"), progress=False)
    for parsed in (peer_config(out), GPTQConfig.from_dict(json.loads((out / "quantize_config.json").read_text()))):
        assert (type(parsed).__name__, parsed.bits, parsed.group_size, parsed.sym, parsed.desc_act, parsed.format) == ("GPTQConfig", 4, 128, True, False, "gptq")
    raw = json.loads((out / "quantize_config.json").read_text())  # AutoGPTQ / GPTQModel read these keys directly
    # RTN ran: no GPTQ settings are claimed (true_sequential / damp_percent belong to GPTQ runs)
    assert (raw["checkpoint_format"], raw["static_groups"], raw["lowbit_method"]) == ("gptq", False, "rtn")
    assert "true_sequential" not in raw and "damp_percent" not in raw


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_export_states_the_gptq_settings_that_ran(tmp_path, act_order):
    """desc_act / static_groups / true_sequential / damp_percent in the auto_gptq config are GPTQ's real settings."""
    from tests.conftest import save_tiny_model_with_tokenizer

    text = " ".join(["it is a truth universally acknowledged that a single man in possession of a good fortune"] * 60)
    (tmp_path / "t.txt").write_text(text)
    save_tiny_model_with_tokenizer(tmp_path / "m", text)
    out = tmp_path / "q"
    lowbit.quantize(str(tmp_path / "m"), lowbit.GptqConfig(act_order=act_order, damp_percent=0.05, true_sequential=False), Scheme(4, 64, True),
                    lowbit.CalibConfig(dataset=str(tmp_path / "t.txt"), nsamples=2, seqlen=32, batch_size=2),
                    lowbit.RunConfig(output_dir=str(out), formats=("auto_gptq",), device="cpu"), progress=False)
    raw = json.loads((out / "quantize_config.json").read_text())
    assert (raw["desc_act"], raw["static_groups"], raw["true_sequential"], raw["damp_percent"], raw["lowbit_method"]) == (act_order, True, False, 0.05, "gptq")
