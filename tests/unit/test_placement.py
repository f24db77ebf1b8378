"""Placement of a block over several devices (placement.py): the estimate and the plan are pure functions of
sizes, checked here against hand-computed numbers; no GPU is needed (torch.device("cuda:1") is just a name)."""

import pytest
import torch

import lowbit
from lowbit.config import AutoRoundConfig, GptqConfig, RtnConfig
from lowbit.errors import LowbitError
from lowbit.placement import BlockSizes, activation_bytes, block_bytes, parse_size, plan, plan_storage

GIB = 1024**3
CUDA0, CUDA1, CUDA2, CPU = torch.device("cuda:0"), torch.device("cuda:1"), torch.device("cuda:2"), torch.device("cpu")
# Llama-3-8B's block: q, k, v, o, gate, up, down as (N out, K in); norms 2 x 4096 bf16
LLAMA8B = {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096), "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336)}


class Fixed:
    """A method whose per-linear needs are given (held = N K bytes, no temporaries): plans by hand."""

    saves_activations = False

    def linear_memory(self, n, k, weight_bytes):
        return n * k, 0


def test_activation_estimate_by_hand():
    sizes = BlockSizes({"a": (30, 10), "b": (10, 30)}, other_bytes=0, weight_bytes=2, batch_tokens=100)
    # no backward: t (4 H + 3 widest N) float32, H = a's K = 10 (the block's input width), widest N = 30
    assert activation_bytes(sizes, training=False) == 100 * (4 * 10 + 3 * 30) * 4
    # backward: every linear's input and output in 16 bits, plus 4 float32 [t, H]
    assert activation_bytes(sizes, training=True) == 100 * (40 + 40) * 2 + 100 * 4 * 10 * 4
    assert activation_bytes(BlockSizes(sizes.linears, 0, 2, batch_tokens=0), training=True) == 0  # RTN: no batch


def test_llama8b_block_fits_one_h200_with_every_method():
    sizes = BlockSizes(LLAMA8B, other_bytes=2 * 4096 * 2, weight_bytes=2, batch_tokens=8 * 2048)
    params = sum(n * k for n, k in LLAMA8B.values())
    assert params == 218_103_808
    ar = block_bytes(sizes, AutoRoundConfig())
    # 2 + 25 bytes per weight (AutoRound's state), the batch's saved activations (sum of K + N = 81920 over
    # the seven linears, 16-bit, plus 4 float32 [t, 4096]) and down's 1024-row export chunk (3 float32)
    assert ar == 2 * 4096 * 2 + params * 27 + (16384 * 81920 * 2 + 16384 * 4 * 4096 * 4) + 3 * 4 * 1024 * 14336
    assert 9 * GIB < ar < 10 * GIB  # measured peak on one H200 (eager, 20 iters, the 4 GiB cache included): 14.1 GiB
    for method in (RtnConfig(), GptqConfig(), AutoRoundConfig()):
        assert not plan(sizes, method, [(CUDA0, 120 * GIB), (CUDA1, 120 * GIB)]).split
    # an 8 GiB cap on the first GPU: after the activations (3.5 GiB), q..up take 4.4 GB of AutoRound state
    # there; down (1.6 GB more) goes to cuda:1
    assert plan(sizes, AutoRoundConfig(), [(CUDA0, 8 * GIB), (CUDA1, 120 * GIB)]).linears == {"down": CUDA1}


def test_split_fills_devices_in_forward_order():
    sizes = BlockSizes({"a": (10, 10), "b": (10, 10), "c": (10, 20), "d": (10, 10)}, other_bytes=50, weight_bytes=2)
    # all: 50 + 100 + 100 + 200 + 100 = 550 > 400: split. cuda:0 keeps the 50 bytes of the rest of the block,
    # then a (100) and b (100) fit in 400 - 50; c (200) does not (150 left): c and d go to cuda:1
    p = plan(sizes, Fixed(), [(CUDA0, 400), (CUDA1, 300)])
    assert p.split and p.main == CUDA0 and not p.overcommitted
    assert p.linears == {"c": CUDA1, "d": CUDA1}
    # three devices: a, b on cuda:0 (10 left), c on cuda:1 (50 left), d (100) on cuda:2: never back to an earlier one
    p = plan(sizes, Fixed(), [(CUDA0, 260), (CUDA1, 250), (CUDA2, 1000)])
    assert p.linears == {"c": CUDA1, "d": CUDA2}
    device_of = p.device_of("model.layers.3")
    assert device_of("model.layers.3.c.weight") == CUDA1 and device_of("model.layers.3.input_layernorm.weight") == CUDA0


def test_temporaries_count_once_per_device():
    class WithTemp(Fixed):
        def linear_memory(self, n, k, weight_bytes):
            return n * k, 2 * n * k  # e.g. GPTQ's solve: one linear at a time

    sizes = BlockSizes({"a": (10, 10), "b": (10, 10)}, other_bytes=0, weight_bytes=2)
    # on one device: 100 + 100 held + the largest temporary 200 = 400
    assert block_bytes(sizes, WithTemp()) == 400
    assert not plan(sizes, WithTemp(), [(CUDA0, 400), (CUDA1, 400)]).split
    # 399: a (100 + 200) stays, b would add 100 (the temporary is already counted): 400 > 399 -> cuda:1
    assert plan(sizes, WithTemp(), [(CUDA0, 399), (CUDA1, 400)]).linears == {"b": CUDA1}


def test_overcommitted_goes_where_most_is_left():
    sizes = BlockSizes({"a": (10, 10), "b": (10, 10), "c": (10, 10)}, other_bytes=0, weight_bytes=2)
    # a on cuda:0 (50 left), b on cuda:1 (20 left), c fits nowhere: the device with the most left, cuda:0
    p = plan(sizes, Fixed(), [(CUDA0, 150), (CUDA1, 120)])
    assert p.overcommitted and p.linears == {"b": CUDA1}


def test_cache_goes_where_memory_is():
    budgets = [(CUDA0, 100), (CUDA1, 70)]
    assert plan_storage(cache_bytes=40, block_need=60, budgets=budgets) == CUDA0  # beside the block
    assert plan_storage(cache_bytes=50, block_need=60, budgets=budgets) == CUDA1  # the other GPU
    assert plan_storage(cache_bytes=80, block_need=60, budgets=budgets) == CPU  # nowhere on a GPU
    assert plan_storage(cache_bytes=10**12, block_need=0, budgets=[(CPU, 1)]) == CPU


@pytest.mark.parametrize("text,value", [("20GiB", 20 * GIB), ("512MB", 512 * 10**6), ("1e9", 10**9), ("300 kib", 300 * 1024)])
def test_sizes(text, value):
    assert parse_size(text) == value


def test_bad_max_memory_is_one_line():
    with pytest.raises(LowbitError, match="is not a size") as err:
        lowbit.RunConfig(device="cpu", max_memory="lots")
    assert "\n" not in str(err.value)
    with pytest.raises(LowbitError, match=r"gives 1 sizes for 2 device\(s\); give one size per --device_map entry"):
        lowbit.RunConfig(device_map="cpu,cpu", max_memory="1GiB")
    assert lowbit.RunConfig(device_map="cpu,cpu", max_memory="1MiB,1GiB").max_memory_bytes == (1024**2, GIB)


def test_scan_shares_split_the_bytes_in_file_order():
    from pathlib import Path

    from lowbit.model.scan import share_by_bytes

    f = Path("a.safetensors")
    tensors = [(f, n, torch.float32, b, e) for n, b, e in [("x", 0, 100), ("y", 100, 150), ("z", 150, 400)]]
    # 400 bytes over two processes: x's middle (50) and y's (125) in the first 200, z's (275) in the second
    assert [t[1] for t in share_by_bytes(tensors, 0, 2)] == ["x", "y"]
    assert [t[1] for t in share_by_bytes(tensors, 1, 2)] == ["z"]
    assert share_by_bytes(tensors, 0, 1) == tensors
    assert sum((share_by_bytes(tensors, r, 3) for r in range(3)), []) == tensors  # every tensor once, in order


def test_experts_see_their_routed_share():
    """AutoRound's saved activations: an expert linear holds only the tokens routed to it (top_k of E)."""
    from torch import nn

    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.up_proj, self.down_proj = nn.Linear(4, 6, bias=False), nn.Linear(6, 4, bias=False)

    class Moe(nn.Module):
        top_k = 2

        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(4, 4, bias=False)
            self.experts = nn.ModuleList(Expert() for _ in range(8))

    block = Moe()
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    sizes = BlockSizes.of(block, linears, torch.float32, batch_tokens=10)
    assert sizes.routed == {n: 2 / 8 for n in linears if n.startswith("experts.")}
    # q_proj: every token (4 + 4); 8 experts x (up 6 + 4, down 4 + 6) at a quarter of the tokens each; the
    # experts' weights (8 x (6 x 4 + 4 x 6)) stacked for the grouped GEMMs and their gradient, twice
    assert activation_bytes(sizes, training=True) == int(10 * (8 + 8 * 20 * 0.25) * 4) + 10 * 4 * 4 * 4 + 2 * 8 * 48 * 4
