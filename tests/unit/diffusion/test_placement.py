"""The placement plan of a pipeline over several GPUs, on the CPU: a pure function of sizes and budgets.

The failure it guards against (auto-round's, before its fix): the transformer spread over the GPUs as if
alone, the text encoders and VAE then pushing a GPU past its memory."""

import pytest
import torch

from lowbit.diffusion.placement import STREAM, budget, module_bytes, plan_placement
from lowbit.errors import LowbitError

GB = 10**9
COMPONENTS = {"text_encoder": GB // 4, "text_encoder_2": 9 * GB, "vae": GB // 5}  # CLIP-L, T5-XXL, the VAE (bf16, FLUX-like)
BLOCKS = [(f"transformer_blocks.{i}", 1.2 * GB) for i in range(8)] + [(f"single_transformer_blocks.{i}", 0.6 * GB) for i in range(10)]
BLOCKS = [(n, int(b)) for n, b in BLOCKS]


def used_by_hand(plan, rest, workspace, home):
    """Bytes on each device, recomputed from the plan's assignments."""
    out = {}
    for name, dev in plan.components.items():
        out[dev] = out.get(dev, 0) + COMPONENTS[name]
    for name, dev in plan.blocks.items():
        if dev != STREAM:
            out[dev] = out.get(dev, 0) + dict(BLOCKS)[name]
    out[home] = out.get(home, 0) + rest + workspace
    return out


def test_every_component_is_counted_and_no_device_overflows():
    max_memory = {0: "14GB", 1: "14GB"}
    plan = plan_placement(COMPONENTS, GB // 2, BLOCKS, max_memory, "cuda:0", workspace=2 * GB)
    used = used_by_hand(plan, GB // 2, 2 * GB, "cuda:0")
    assert used == {d: b for d, b in plan.used.items() if b}
    for dev, cap in budget(max_memory).items():
        assert used.get(dev, 0) <= cap, (dev, used)
    # the text encoders and the VAE are on GPUs, whole
    assert set(plan.components) == set(COMPONENTS) and all(d.startswith("cuda:") for d in plan.components.values())
    # blocks keep forward order over the devices (cuda:0 ... then cuda:1 ..., then streamed)
    order = ["cuda:0", "cuda:1", STREAM]
    ranks = [order.index(plan.blocks[n]) for n, _ in BLOCKS]
    assert ranks == sorted(ranks)
    # 28 GB of GPU for 0.5 + 2 + 9.45 GB of the rest and 15.6 GB of blocks: some blocks must be streamed
    assert STREAM in plan.blocks.values() and plan.blocks[BLOCKS[0][0]] == "cuda:0"


def test_the_transformer_alone_would_overflow_a_gpu():
    """Planning the blocks without the components (the bug) puts more on cuda:0 than it holds once T5 is there."""
    max_memory = {0: 12 * GB, 1: 12 * GB}
    alone = plan_placement({}, 0, BLOCKS, max_memory, "cuda:0")
    on_first = sum(b for n, b in BLOCKS if alone.blocks[n] == "cuda:0")
    assert on_first + COMPONENTS["text_encoder_2"] > 12 * GB
    counted = plan_placement(COMPONENTS, 0, BLOCKS, max_memory, "cuda:0")
    t5 = counted.components["text_encoder_2"]
    assert sum(b for n, b in BLOCKS if counted.blocks[n] == t5) + COMPONENTS["text_encoder_2"] <= 12 * GB


def test_one_gpu_small_pipeline_is_all_resident_and_block_map_sends_streamed_blocks_home():
    plan = plan_placement(COMPONENTS, GB, BLOCKS, {"cuda:0": 200 * GB}, "cuda:0")
    assert set(plan.blocks.values()) == {"cuda:0"}
    tight = plan_placement({}, GB, BLOCKS[:3], {"cuda:0": int(3.5 * GB)}, "cuda:0")
    assert [tight.blocks[n] for n, _ in BLOCKS[:3]] == ["cuda:0", "cuda:0", STREAM]
    assert tight.block_map("cuda:0") == {"": "cuda:0", "transformer_blocks.0": "cuda:0", "transformer_blocks.1": "cuda:0", "transformer_blocks.2": "cuda:0"}


def test_a_component_too_large_for_every_gpu_runs_on_the_cpu():
    plan = plan_placement({"text_encoder_2": 30 * GB}, GB, BLOCKS[:2], {0: 20 * GB, 1: 20 * GB, "cpu": 100 * GB}, "cuda:0")
    assert plan.components["text_encoder_2"] == "cpu"
    assert all(d != "cpu" for d in plan.blocks.values())  # blocks never go to the CPU: streamed instead


def test_home_too_small_for_the_transformer_rest_is_refused():
    with pytest.raises(LowbitError, match="cuda:0 has 1.00 GiB"):
        plan_placement({}, 2 * 2**30, BLOCKS, {0: "1GiB"}, "cuda:0")


def test_module_bytes_counts_a_meta_flux_block_by_hand():
    from accelerate import init_empty_weights
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    with init_empty_weights():
        block = FluxSingleTransformerBlock(dim=64, num_attention_heads=2, attention_head_dim=32)
    # norm.linear 64 -> 192, proj_mlp 64 -> 256, proj_out 320 -> 64, q / k / v 64 -> 64, q / k RMSNorm weights 32 each
    params = (64 * 192 + 192) + (64 * 256 + 256) + (320 * 64 + 64) + 3 * (64 * 64 + 64) + 2 * 32
    assert module_bytes(block, torch.bfloat16) == 2 * params


def test_a_reserve_is_kept_on_every_other_gpu_that_runs_something():
    """The activations of what runs on a GPU besides home (measured at FLUX.1-dev: the capture peaked 0.9 GiB over
    the weights planned on the second H200) are kept free there, once per GPU used, and never on a GPU unused.
    By hand: cuda:0 has 12 - 0.5 - 2 = 9.5 GB for blocks: 7 double blocks (8.4 GB); cuda:1 has 6 GB, 5 after its
    1 GB reserve: the 8th double block (1.2) and 6 single ones (3.6), the other 4 streamed (8 single ones and 2
    streamed without the reserve); cuda:2 receives nothing and keeps no reserve."""
    max_memory = {0: "12GB", 1: "6GB", 2: "0GB"}
    plan = plan_placement({}, GB // 2, BLOCKS, max_memory, "cuda:0", workspace=2 * GB, reserve=GB)
    count = lambda p, dev: sum(1 for d in p.blocks.values() if d == dev)  # noqa: E731
    assert (count(plan, "cuda:0"), count(plan, "cuda:1"), count(plan, STREAM)) == (7, 7, 4)
    assert plan.used == {"cuda:0": int(0.5 * GB + 2 * GB + 7 * 1.2 * GB), "cuda:1": int(GB + 1.2 * GB + 6 * 0.6 * GB), "cuda:2": 0}
    bare = plan_placement({}, GB // 2, BLOCKS, max_memory, "cuda:0", workspace=2 * GB)
    assert (count(bare, "cuda:0"), count(bare, "cuda:1"), count(bare, STREAM)) == (7, 9, 2)
