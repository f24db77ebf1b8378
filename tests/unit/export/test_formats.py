"""Each export format's exact tensors, pinned by hand-computed words and shapes, and its refusals."""

import json

import pytest
import torch

import lowbit
from lowbit.config import Scheme
from lowbit.errors import LowbitError
from lowbit.export import auto_awq, auto_gptq, auto_round, compressed_tensors
from lowbit.quant import QuantResult, quantize_weight


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


@pytest.mark.parametrize("fmt", [auto_round, auto_gptq, auto_awq, compressed_tensors])
def test_read_layer_inverts_layer_tensors(fmt):
    scheme = Scheme(4, 32, fmt is auto_gptq)
    r = quantize_weight(torch.randn(40, 96), scheme)
    tensors = fmt.layer_tensors("x", r)
    back = fmt.read_layer(tensors.__getitem__, "x", scheme, 40, 96)
    assert torch.equal(back.codes, r.codes) and torch.equal(back.zero, r.zero) and torch.equal(back.scale, r.scale)


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


def test_several_formats_write_side_by_side_and_load_identically(tiny_llama, tmp_path):
    src, _ = tiny_llama
    out = tmp_path / "q"
    lowbit.quantize(str(src), "rtn", Scheme(4, 64, False), run=lowbit.RunConfig(output_dir=str(out), formats=("auto_round", "auto_awq", "compressed-tensors"), device="cpu"), progress=False)
    x = torch.randint(0, 512, (1, 16))
    logits = {f: lowbit.load(out / f)(x).logits for f in ("auto_round", "auto_awq", "compressed-tensors")}
    assert torch.equal(logits["auto_round"], logits["auto_awq"]) and torch.equal(logits["auto_round"], logits["compressed-tensors"])
    awq = json.loads((out / "auto_awq" / "config.json").read_text())["quantization_config"]
    assert (awq["quant_method"], awq["version"], awq["zero_point"], awq["bits"], awq["group_size"]) == ("awq", "gemm", True, 4, 64)
    ct = json.loads((out / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    assert ct["format"] == "pack-quantized" and ct["config_groups"]["group_0"]["weights"]["strategy"] == "group"
    assert (out / "auto_round" / "tokenizer_config.json").exists() or not list(src.glob("tokenizer*"))


def test_gptq_writes_quantize_config(tiny_llama, tmp_path):
    src, _ = tiny_llama
    out = tmp_path / "q"
    lowbit.quantize(str(src), "rtn", Scheme(4, 128, True), run=lowbit.RunConfig(output_dir=str(out), formats=("auto_gptq",), device="cpu"), progress=False)
    qc = json.loads((out / "quantize_config.json").read_text())
    assert (qc["quant_method"], qc["checkpoint_format"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == ("gptq", "gptq", 4, 128, True, False)
    assert json.loads((out / "config.json").read_text())["quantization_config"] == qc
