"""A sharded checkpoint is what its `model.safetensors.index.json` lists, as for transformers' loaders: a
safetensors file beside the shards (Mistral's repositories ship consolidated.safetensors, the same weights under
other names) or a tensor a shard holds but the index does not list is not part of the model: not copied into
the output as an unknown tensor, not scanned for NaN. An index that disagrees with its shards is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lowbit
from lowbit import LowbitError, RunConfig, Scheme
from tests.conftest import save_tiny_llama


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny 2-block Llama saved by transformers in several shards with an index (and its one-file twin)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("ckpt")
    single = root / "single"
    save_tiny_llama(single, hidden=64, intermediate=128, layers=2, vocab=128, heads=2, kv_heads=1)
    model = AutoModelForCausalLM.from_pretrained(single)
    model.save_pretrained(root / "sharded", max_shard_size="40KB")
    index = json.loads((root / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # really sharded
    return root / "sharded"


def quantize(model, out):
    return lowbit.quantize(str(model), "rtn", Scheme(4, 32, False), run=RunConfig(output_dir=str(out), device="cpu"), progress=False)


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def test_files_and_tensors_outside_the_index_are_not_the_model(sharded, tmp_path):
    quantize(sharded, tmp_path / "ref")
    reference = tensors(tmp_path / "ref")
    extra = tmp_path / "extra"
    shutil.copytree(sharded, extra)
    # Mistral's layout: the same weights again, under its own names, with a NaN the scan must not see
    weights = {k: v for f in sorted(sharded.glob("model-*.safetensors")) for k, v in load_file(f).items()}
    consolidated = {k.replace("model.layers.", "layers.").replace("self_attn.q_proj", "attention.wq"): v.clone() for k, v in weights.items()}
    next(iter(consolidated.values())).view(-1)[0] = float("nan")
    save_file(consolidated, extra / "consolidated.safetensors")
    # a shard holding one tensor more than the index lists
    shard = sorted(extra.glob("model-*.safetensors"))[0]
    held = load_file(shard)
    held["model.layers.0.mlp.gate_proj.weight_unlisted"] = torch.full((4, 4), float("inf"))
    save_file(held, shard, metadata={"format": "pt"})

    summary = quantize(extra, tmp_path / "out")
    assert not summary.unmapped
    got = tensors(tmp_path / "out")
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in reference)


def test_an_index_naming_a_missing_shard_is_refused(sharded, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    gone = sorted(broken.glob("model-*.safetensors"))[-1]
    gone.unlink()
    with pytest.raises(LowbitError, match=f"lists {gone.name} for .*, which is not in") as info:
        quantize(broken, tmp_path / "out")
    assert "\n" not in str(info.value) and "download every shard" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_an_index_that_disagrees_with_its_shards_is_refused(sharded, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    index_file = broken / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][name] = files[1]  # listed in a shard that does not hold it
    index_file.write_text(json.dumps(index))
    with pytest.raises(LowbitError, match=f"tensor '{name}' is listed in the index for {files[1]} but that file does not hold it") as info:
        quantize(broken, tmp_path / "out")
    assert "\n" not in str(info.value)
