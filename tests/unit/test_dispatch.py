"""A quantized model placed over several devices (`loading.dispatch`, what `lowbit.load` does with a map naming
several GPUs) under `generate`'s compile with a static cache: the tokens of the unplaced eager model, one
compiled graph whatever the number of blocks, and the weights where the map put them.

On the CPU the map's two groups of blocks (first half with the embeddings, second half with the norm and
lm_head) both name the CPU: the hooks and what dynamo makes of them are the same as on two GPUs, only the copies
are no-ops. accelerate's `dispatch_model` hooks fail the frame check here (66 frames, 45 graph breaks, the
recompile limit hit three times, for 2 blocks as for 6: measured with torch 2.13 / accelerate 1.15); the
two-GPU test below runs the real copies.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import lowbit
from lowbit.loading import device_for, dispatch
from tests.conftest import save_tiny_llama

NEW_TOKENS = 3


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Tiny Llamas of 2 and 6 blocks, RTN W4 g32."""
    root = tmp_path_factory.mktemp("dispatch")
    made = {}
    for layers in (2, 6):
        save_tiny_llama(root / f"fp{layers}", hidden=64, intermediate=128, vocab=128, layers=layers, heads=2, kv_heads=1, seed=5)
        made[layers] = root / f"q{layers}"
        lowbit.quantize(str(root / f"fp{layers}"), "rtn", lowbit.Scheme(4, 32, False), run=lowbit.RunConfig(output_dir=str(made[layers]), device="cpu"),
                        progress=False)
    return made


def two_groups(layers: int, devices=("cpu", "cpu")) -> dict:
    """A map in infer_auto_device_map's form: embeddings and the first half of the blocks on one device, the
    rest with the final norm and lm_head on the other."""
    half = layers // 2
    first = ["model.embed_tokens", "model.rotary_emb"] + [f"model.layers.{i}" for i in range(half)]
    second = [f"model.layers.{i}" for i in range(half, layers)] + ["model.norm", "lm_head"]
    return {**dict.fromkeys(first, devices[0]), **dict.fromkeys(second, devices[1])}


def generate(model, ids: torch.Tensor, compile_config=None) -> tuple[torch.Tensor, int, int]:
    """Greedy tokens with a static cache, and the frames dynamo compiled and the graph breaks it met."""
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static",
                             compile_config=compile_config, pad_token_id=0)
    return out, counters["frames"]["total"], sum(counters["graph_break"].values())


def cpu_compile():
    from transformers import CompileConfig

    config = CompileConfig(backend="eager")
    config._compile_all_devices = True  # generate compiles on CUDA only unless told (transformers' own tests do this)
    return config


def test_compiled_generate_one_graph_for_any_depth(exports):
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    eager, eager_frames, _ = generate(lowbit.load(exports[2]), ids)
    assert eager_frames == 0  # the reference is not compiled
    frames = {}
    for layers, path in exports.items():
        tokens, frames[layers], breaks = generate(dispatch(lowbit.load(path), two_groups(layers)), ids, cpu_compile())
        assert breaks == 0
        if layers == 2:
            assert torch.equal(tokens, eager)
    assert frames[2] == frames[6] == 1, frames  # the forward, compiled once, as the unplaced model's


@pytest.mark.parametrize("kind", ["auto", "overrides"])
def test_dispatch_moves_nothing_and_patches_no_forward(exports, kind):
    """The hooks go on the modules holding no map entry below them whose parent does: with accelerate's auto
    form that is each entry; with a "" entry and overrides, also the modules the "" entry keeps."""
    model = lowbit.load(exports[6])
    if kind == "auto":
        device_map, expect = two_groups(6), two_groups(6)
    else:
        device_map = {"": "cpu", "model.layers.3": "cpu", "model.layers.4": "cpu"}
        expect = ["lm_head", "model.embed_tokens", "model.norm", "model.rotary_emb", *(f"model.layers.{i}" for i in range(6))]
    before = {name: (t.device, t.data_ptr()) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    dispatch(model, device_map)
    after = {name: (t.device, t.data_ptr()) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    assert after == before
    assert all(device == torch.device(device_for(device_map, name)) for name, (device, _) in after.items())
    assert model.hf_device_map == device_map
    assert not [name for name, m in model.named_modules() if "forward" in vars(m) or hasattr(m, "_hf_hook")]
    hooked = [name for name, m in model.named_modules() if m._forward_pre_hooks]
    assert sorted(hooked) == sorted(["", *expect]), hooked
    assert [name for name, m in model.named_modules() if m._forward_hooks] == [""]  # the output back to the first device


@pytest.mark.multigpu
def test_two_gpus_auto_map_compiled_generate(exports):
    """`lowbit.load(device_map="auto")` split over two GPUs: each tensor on its map's device, the compiled
    generate's tokens those of one GPU, one graph (inductor, the transformers default compile)."""
    cpu = lowbit.load(exports[6], dtype=torch.float16)
    size = lambda m: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])  # noqa: E731
    # cuda:0: the embeddings, 3 blocks and accelerate's reserve for the largest layer still to place (lm_head)
    budget = size(cpu.model.embed_tokens) + size(cpu.lm_head) + int(3.5 * size(cpu.model.layers[0]))
    model = lowbit.load(exports[6], device_map="auto", max_memory={0: budget, 1: "1GiB"})
    blocks = [str(model.hf_device_map[f"model.layers.{i}"]) for i in range(6)]
    assert blocks == ["0"] * 3 + ["1"] * 3, model.hf_device_map
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t.device == torch.device(device_for(model.hf_device_map, name)), name
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0)).to("cuda:0")
    split, frames, breaks = generate(model, ids)
    one, _, _ = generate(lowbit.load(exports[6], device_map="cuda:0"), ids)
    assert split.device == torch.device("cuda:0") and torch.equal(split, one)
    assert frames == 1 and breaks == 0, (frames, breaks)
