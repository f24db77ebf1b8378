"""A block spread over several devices (placement.py) computes what it computes on one.

On a machine without GPUs the split path runs over two slots of the CPU (`--device_map cpu,cpu`) with a
`--max_memory` that leaves room on the first for the attention's linears only: the MLP's linears are loaded
on the second slot and reached through accelerate's hooks, the algorithms work on each weight's own
device; every byte written must equal the one-device run's. (Two real GPUs: bench/dist_gpu.py checks it.)
"""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.placement import BlockSizes, activation_bytes
from tests.conftest import save_tiny_model_with_tokenizer
from tests.e2e.test_data_parallel import TEXT

SCHEME = lowbit.Scheme(4, 32, False)
CALIB = dict(nsamples=4, seqlen=32, batch_size=2)
METHODS = {"gptq": lowbit.GptqConfig(), "awq": lowbit.AwqConfig(n_grid=4), "autoround": lowbit.AutoRoundConfig(iters=4)}
ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("place")
    (root / "t.txt").write_text(TEXT)
    save_tiny_model_with_tokenizer(root / "m", TEXT, hidden=64, intermediate=128, heads=2, kv_heads=1)
    return root


def first_slot_budget(folder, method) -> int:
    """Bytes that hold block 0 without its MLP linears, by the placement's own estimate: the rest of the
    block, the batch's activations and the attention linears' state (weights, then the largest temporary)."""
    from transformers import AutoConfig

    from lowbit.model.skeleton import build_skeleton

    block = build_skeleton(AutoConfig.from_pretrained(folder), torch.float32).model.layers[0]
    linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    sizes = BlockSizes.of(block, linears, torch.float32, CALIB["batch_size"] * CALIB["seqlen"])
    needs = [method.linear_memory(*sizes.linears[n], 4) for n in ATTENTION]
    return sizes.other_bytes + activation_bytes(sizes, method.saves_activations) + sum(h for h, _ in needs) + max(t for _, t in needs)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_split_block_writes_the_one_device_bytes(model, method):
    cfg = METHODS[method]
    calib = lowbit.CalibConfig(dataset=str(model / "t.txt"), **CALIB)
    one = lowbit.quantize(str(model / "m"), cfg, SCHEME, calib, lowbit.RunConfig(output_dir=str(model / f"one-{method}"), device="cpu"), progress=False)
    budget = first_slot_budget(model / "m", cfg)
    split = lowbit.quantize(str(model / "m"), cfg, SCHEME, calib,
                            lowbit.RunConfig(output_dir=str(model / f"split-{method}"), device_map="cpu,cpu", max_memory=f"{budget}B,1GiB"), progress=False)
    assert not one.placements
    # both blocks: the MLP's linears on the second slot, the attention's on the first
    assert sorted(split.placements) == [0, 1]
    assert all(sorted(p) == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"] for p in split.placements.values())
    assert (model / f"one-{method}" / "model.safetensors").read_bytes() == (model / f"split-{method}" / "model.safetensors").read_bytes()


@pytest.mark.gpu
def test_explicit_gpu_index(model, tmp_path):
    """--device cuda:0 (an explicit index, before anything else touched CUDA) runs and reports its VRAM."""
    calib = lowbit.CalibConfig(dataset=str(model / "t.txt"), **CALIB)
    summary = lowbit.quantize(str(model / "m"), lowbit.GptqConfig(), SCHEME, calib, lowbit.RunConfig(output_dir=str(tmp_path / "q"), device="cuda:0"), progress=False)
    assert summary.peak_vram["cuda:0"] > 0


@pytest.mark.multigpu
@pytest.mark.parametrize("method", sorted(METHODS))
def test_split_over_two_gpus_writes_the_one_gpu_bytes(model, tmp_path, method):
    """The MLP's linears on cuda:1 (hooks move their inputs and outputs), the rest on cuda:0: the same
    bytes as the block on cuda:0 alone."""
    cfg = METHODS[method]
    calib = lowbit.CalibConfig(dataset=str(model / "t.txt"), **CALIB)
    one = lowbit.quantize(str(model / "m"), cfg, SCHEME, calib, lowbit.RunConfig(output_dir=str(tmp_path / "one"), device="cuda:0"), progress=False)
    budget = first_slot_budget(model / "m", cfg) // 2  # 16-bit weights on the GPU: half the CPU's float32 estimate
    split = lowbit.quantize(str(model / "m"), cfg, SCHEME, calib,
                            lowbit.RunConfig(output_dir=str(tmp_path / "split"), device_map="0,1", max_memory=f"{budget}B,1GiB"), progress=False)
    assert split.placements and not one.placements
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (tmp_path / "split" / "model.safetensors").read_bytes()
