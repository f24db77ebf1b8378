"""auto_gptq, auto_awq and compressed-tensors exports read by the peers' own loaders from PyPI.

- compressed-tensors 0.20.0 (in the test env): transformers' compressed-tensors integration loads and
  decompresses our symmetric export; for asymmetric exports that integration builds its zero-point
  parameter unpacked ([N, G]) while the format (and vLLM) store it packed ([N*bits/32, G]), so it refuses
  any asymmetric pack-quantized checkpoint; there the package's own PackedQuantizationCompressor
  decompresses our tensors and is compared with ours.
- GPTQModel 7.7.0 (transformers' backend for GPTQ and AWQ checkpoints; it needs torch 2.14, so it lives in
  .venv-peers made by scripts/setup-peers.sh): loads our auto_gptq and auto_awq exports through
  transformers on the CPU; logits compared with lowbit.load's.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from tests.conftest import save_tiny_llama

pytestmark = pytest.mark.interop
ROOT = Path(__file__).resolve().parents[2]
PEERS = ROOT / ".venv-peers" / "bin" / "python"


def export(tmp_path, scheme, fmt):
    src, out = tmp_path / "tiny", tmp_path / fmt
    if not src.exists():
        save_tiny_llama(src)
    lowbit.quantize(str(src), "rtn", scheme, run=lowbit.RunConfig(output_dir=str(out), formats=(fmt,), device="cpu"), progress=False)
    return out


def test_compressed_tensors_symmetric_through_transformers(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    out = export(tmp_path, lowbit.Scheme(4, 64, True), "compressed-tensors")
    x = torch.randint(0, 512, (2, 24))
    ours = lowbit.load(out)(x).logits
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu").eval()
    ref = theirs(x).logits
    rel = ((ours - ref).abs().max() / ours.abs().max()).item()
    print(f"compressed-tensors W4 g64 sym via transformers: max relative logit error {rel:.2e}")
    assert rel < 1e-3


@pytest.mark.parametrize("group_size", [64, -1])
def test_compressed_tensors_asymmetric_through_its_compressor(tmp_path, group_size):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    out = export(tmp_path, lowbit.Scheme(4, group_size, False), "compressed-tensors")
    config = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    scheme = config.config_groups["group_0"]
    tensors = load_file(out / "model.safetensors")
    ours = lowbit.load(out)
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"):
        local = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        theirs = PackedQuantizationCompressor.decompress(local, scheme)["weight"].float()
        mine = ours.get_submodule(name).dequantize_weight(torch.float32)
        torch.testing.assert_close(theirs, mine, rtol=2e-3, atol=1e-4)


PEER_SCRIPT = """
import json, sys, torch, lowbit
from transformers import AutoModelForCausalLM
path = sys.argv[1]
x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
ours = lowbit.load(path)(x).logits
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, device_map="cpu").eval()
layer = type(model.model.layers[0].self_attn.q_proj)
ref = model(x).logits.float()
print(json.dumps({"rel": ((ours - ref).abs().max() / ours.abs().max()).item(), "layer": layer.__module__ + "." + layer.__name__}))
"""


@pytest.mark.skipif(not PEERS.exists(), reason="run scripts/setup-peers.sh (scripts/test.sh does) for GPTQModel")
@pytest.mark.parametrize("fmt,sym", [("auto_gptq", True), ("auto_awq", False)])
def test_gptqmodel_loads_through_transformers(tmp_path, fmt, sym):
    out = export(tmp_path, lowbit.Scheme(4, 128, sym), fmt)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([str(PEERS), "-c", PEER_SCRIPT, str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{fmt} via transformers + GPTQModel ({result['layer']}): max relative logit error {result['rel']:.2e}")
    assert result["layer"].startswith("gptqmodel."), result
    assert result["rel"] < 5e-3
