"""The grouped MoE kernel (triton/moe.py) against a float64 per-expert reference built from random codes, zeros
and scales, never from the code under test. Outputs are poisoned with NaN first, so an unwritten row fails.

Tiny shapes run everywhere (CPU under TRITON_INTERPRET=1 in CI); `gpu` tests add real widths, CUDA graphs
(the routing changed between replays of one graph) and a second device.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels.repack import Stacked
from lowbit.quant.pack import pack_bitstream

moe = pytest.importorskip("lowbit.kernels.triton.moe")

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}  # relative error, as for the dense kernels


def random_stacked(experts: int, parts: int, n_part: int, k: int, bits: int, group_size: int, bias: bool, seed: int, device,
                   sym: bool = False):
    """A Stacked projection with random codes and its float64 W_e^T [E, K, P*NP] (parts side by side, [gate; up]);
    sym: every zero point 2^(bits-1), else random."""
    gen = torch.Generator().manual_seed(seed)
    gs = k if group_size == -1 else group_size
    g = -(-k // gs)
    codes = torch.randint(0, 2**bits, (experts, parts, k, n_part), generator=gen)
    zeros = torch.randint(0, 2**bits, (experts, parts, g, n_part), generator=gen)
    if sym:
        zeros.fill_(2 ** (bits - 1))
    scales = (torch.rand(experts, parts, g, n_part, generator=gen) * 0.05 + 0.005).half()
    group = torch.arange(k) // gs
    w_t = (codes.double() - zeros.double()[:, :, group]) * scales.double()[:, :, group]  # [E, P, K, NP]
    w_t = w_t.permute(0, 2, 1, 3).reshape(experts, k, parts * n_part)
    qweight = torch.stack([torch.stack([pack_bitstream(codes[e, p], bits, dim=0) for p in range(parts)]) for e in range(experts)])
    b = (torch.randn(experts, parts, n_part, generator=gen) * 0.1).half() if bias else None
    stacked = Stacked(qweight.to(device), scales.to(device), zeros.half().to(device), None if b is None else b.to(device), bits, gs)
    return stacked, w_t, b


def reference(x, top_k_index, w_t, bias, weights, rows_per_token: int, interleave: bool):
    """float64 out [S, N]: pair p = t * k + slot reads x[p // rows_per_token] and expert top_k_index[t, slot]."""
    ids = top_k_index.reshape(-1)
    experts, _, n = w_t.shape
    out = torch.zeros(ids.numel(), n, dtype=torch.float64)
    for p, e in enumerate(ids.tolist()):
        if e >= experts:  # expert-parallel sentinel: nothing
            continue
        row = x[p // rows_per_token].double() @ w_t[e]
        if bias is not None:
            row = row + bias[e].double().reshape(-1)
        if weights is not None:
            row = row * weights.reshape(-1)[p].double()
        out[p] = row
    if interleave:  # [gate; up] -> [g0, u0, g1, u1, ...]
        out = out.view(-1, 2, n // 2).transpose(1, 2).reshape(-1, n)
    return out


def routing(tokens: int, top_k: int, experts: int, used: list[int], seed: int, sentinel: bool = False):
    """top_k distinct experts per token drawn from `used` (the others get no token); with `sentinel`, one slot
    holds the id E (an expert-parallel placeholder)."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.tensor(used)[torch.randperm(len(used), generator=gen)[:top_k]] for _ in range(tokens)]
    index = torch.stack(rows)
    if sentinel:
        index[tokens // 2, -1] = experts
    weights = torch.rand(tokens, top_k, generator=gen)
    return index, weights


def check_align(index, experts: int, block_m: int, sorted_ids, block_expert):
    """Every pair sits exactly once in its expert's blocks, experts in order, padding holds S."""
    ids = index.reshape(-1).tolist()
    s = len(ids)
    sorted_ids, block_expert = sorted_ids.cpu().view(-1, block_m), block_expert.cpu()
    assert block_expert.numel() == moe.max_blocks(s, experts, block_m)
    seen, last = [], -1
    for b, e in enumerate(block_expert.tolist()):
        rows = [p for p in sorted_ids[b].tolist() if p != s]
        if e == experts + 1:  # past the used blocks
            assert not rows
            continue
        assert last <= e <= experts and rows  # no empty block inside the used range
        last = e
        assert all(min(ids[p], experts) == e for p in rows)
        seen += rows
    assert sorted(seen) == list(range(s))
    bins = [min(i, experts) for i in ids]
    used = sum(-(-bins.count(e) // block_m) for e in range(experts + 1))
    assert (block_expert <= experts).sum().item() == used


@pytest.mark.parametrize("tokens,top_k,block_m", [(1, 1, 16), (7, 2, 16), (40, 2, 16), (33, 3, 32)])
def test_align(device, tokens, top_k, block_m):
    experts = 6
    index, _ = routing(tokens, top_k, experts, [0, 2, 3, 5], seed=tokens, sentinel=tokens > 1)
    sorted_ids, block_expert = moe.align(index.to(device), experts, block_m)
    check_align(index, experts, block_m, sorted_ids, block_expert)


# (name, parts, interleave, bias, first projection?, top_k, tokens, bits, group, K, NP, dtype, block_m)
# first projection: x holds tokens (pair p reads x[p // top_k]); else x holds pairs and router weights apply.
CASES = {
    "gate_up_unpack4": (2, False, False, True, 2, 7, 4, 128, 256, 32, torch.float16, 16),
    "gate_up_interleaved_bias_small_groups": (2, True, True, True, 2, 5, 4, 32, 96, 32, torch.float16, 16),
    "down_weighted_top1_w8_per_channel": (1, False, True, False, 1, 9, 8, -1, 96, 48, torch.float16, 16),
    "down_weighted_w2_bf16_block32": (1, False, False, False, 2, 11, 2, 128, 256, 16, torch.bfloat16, 32),
    "gate_up_w4_bf16_magic_block64": (2, False, False, True, 2, 3, 4, 128, 128, 16, torch.bfloat16, 64),
}


@pytest.mark.parametrize("case", list(CASES))
def test_grouped_matmul(device, case):
    parts, interleave, bias, first, top_k, tokens, bits, group, k, n_part, dtype, block_m = CASES[case]
    experts = 5
    w, w_t, b = random_stacked(experts, parts, n_part, k, bits, group, bias, seed=len(case), device=device)
    index, weights = routing(tokens, top_k, experts, [0, 1, 3] if top_k < 3 else [0, 1, 3, 4], seed=tokens, sentinel=not first)
    gen = torch.Generator().manual_seed(1)
    rows = tokens if first else tokens * top_k
    x = torch.randn(rows, k, generator=gen).to(dtype)
    pair_weights = None if first else weights.reshape(-1).to(dtype)
    sorted_ids, block_expert = moe.align(index.to(device), experts, block_m)
    out = torch.full((tokens * top_k, parts * n_part), float("nan"), dtype=dtype, device=device)
    got = moe.grouped_matmul(x.to(device), sorted_ids, block_expert, w, top_k if first else 1, block_m,
                             weights=None if pair_weights is None else pair_weights.to(device), interleave=interleave, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.isfinite(out).all(), "a row was not written"
    ref = reference(x, index, w_t, b, pair_weights, top_k if first else 1, interleave)
    err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], err
    if not first:  # the sentinel pair's row is zero
        sentinel = (index.reshape(-1) >= experts).nonzero().flatten()
        assert sentinel.numel() == 1 and (out[sentinel.item()] == 0).all()


def test_pick_chooses_the_h200_sweeps_best_tiles():
    """The column-tile rule against the H200 sweep (bench/results/moe-kernel-2026-11-30.json, Qwen3-30B-A3B
    experts, 128 experts, top-8): the fastest tile per size and projection, or one within 2% of it."""
    best = {1: ({32}, {32, 64}), 8: ({64}, {64}), 64: ({128}, {128}), 2048: ({128, 64}, {128, 64})}
    for tokens, (gate_up, down) in best.items():
        pairs = tokens * 8
        block_m = moe.block_m_for(pairs, 128)
        assert block_m == (64 if tokens == 2048 else 16)
        assert moe.pick(block_m, 2, 768, pairs, 128, sm_count=132).block_n in gate_up
        assert moe.pick(block_m, 1, 2048, pairs, 128, sm_count=132).block_n in down


# ---------------------------------------------------------------- K split (decode sizes): splitk.py's reductions

# (name, parts, interleave, bias, first projection?, top_k, tokens, bits, group, sym, K, NP, dtype, block_m,
#  split_k, in_kernel_reduce, experts used): K / 128 chunks shared by split_k programs per tile; uneven where
#  split_k does not divide them (5 chunks over 2: 3 + 2, over 3: 2 + 2 + 1; 3 over 2: 2 + 1); more splits
#  than chunks give one chunk each. The routings use 1-2 of 5 experts, so the others get no token.
SPLIT_CASES = {
    "w4_g128_asym_gate_up_unpack4_5_chunks_over_2": (2, False, False, True, 2, 3, 4, 128, False, 640, 32, torch.float16, 16, 2, True, [1, 3]),
    "w4_g128_sym_down_weighted_5_chunks_over_3_buffer": (1, False, False, False, 2, 4, 4, 128, True, 640, 32, torch.float16, 16, 3, False, [0, 3]),
    "w8_per_channel_down_weighted_bias_4_over_4": (1, False, True, False, 1, 5, 8, -1, False, 512, 16, torch.float16, 16, 4, True, [2]),
    "w2_g64_sym_gate_up_interleaved_bias_bf16_3_over_2": (2, True, True, True, 2, 3, 2, 64, True, 384, 16, torch.bfloat16, 32, 2, True, [0, 4]),
    "w4_g32_asym_down_weighted_bf16_2_chunks_over_8": (1, False, False, False, 2, 3, 4, 32, False, 256, 32, torch.bfloat16, 16, 8, True, [1, 2]),
    "w8_g64_sym_gate_up_block64_3_over_3_buffer": (2, False, False, True, 1, 4, 8, 64, True, 384, 16, torch.float16, 64, 3, False, [4]),
}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_grouped_matmul_split_k(device, case):
    """The split-K launch against the float64 reference: every row written (NaN-poisoned out), bias and router
    weight applied once, sentinel rows zero, the persistent workspace and counters back at zero afterwards and
    nothing past this launch's [S, N] rows touched (the rest of the workspace poisoned)."""
    from lowbit.kernels.triton import splitk

    (parts, interleave, bias, first, top_k, tokens, bits, group, sym, k, n_part, dtype, block_m, split, ikr, used) = SPLIT_CASES[case]
    experts = 5
    w, w_t, b = random_stacked(experts, parts, n_part, k, bits, group, bias, seed=len(case), device=device, sym=sym)
    index, weights = routing(tokens, top_k, experts, used, seed=tokens + 7, sentinel=not first)
    rows = tokens if first else tokens * top_k
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(2)).to(dtype)
    pair_weights = None if first else weights.reshape(-1).to(dtype)
    sorted_ids, block_expert = moe.align(index.to(device), experts, block_m)
    s, n = tokens * top_k, parts * n_part
    ws, counters = splitk.workspace(torch.device(device), s * n + 64, block_expert.numel() * n)
    ws[s * n:] = float("nan")  # past this launch's rows: must stay untouched
    try:
        out = torch.full((s, n), float("nan"), dtype=dtype, device=device)
        cfg = moe.MoeConfig(block_m, 16, 128, split_k=split, in_kernel_reduce=ikr)
        moe.grouped_matmul(x.to(device), sorted_ids, block_expert, w, top_k if first else 1, block_m,
                           weights=None if pair_weights is None else pair_weights.to(device), interleave=interleave, out=out, config=cfg)
        assert torch.isfinite(out).all(), "a row was not written"
        assert (ws[: s * n] == 0).all() and (counters == 0).all(), "the workspace was not left at zero"
        assert ws[s * n:].isnan().all(), "the launch wrote past its rows"
    finally:
        ws.zero_()
        counters.zero_()
    ref = reference(x, index, w_t, b, pair_weights, top_k if first else 1, interleave)
    err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], err
    if not first:
        sentinel = (index.reshape(-1) >= experts).nonzero().flatten()
        assert (out[sentinel.item()] == 0).all()
    unsplit = moe.grouped_matmul(x.to(device), sorted_ids, block_expert, w, top_k if first else 1, block_m,
                                 weights=None if pair_weights is None else pair_weights.to(device), interleave=interleave,
                                 config=moe.MoeConfig(block_m, 16, 128))
    assert ((out.double() - unsplit.double()).norm() / ref.norm()).item() < TOL[dtype]  # the same sums, another order


def test_split_k_default_rule_on_cpu(device):
    """grouped_matmul without a config splits by the table's rule (4 SMs on the CPU: a deep layer splits) and
    split_k=1 gives the single-pass kernel; both match the reference."""
    experts, top_k, tokens, k, n_part = 4, 2, 1, 1024, 16
    w, w_t, _ = random_stacked(experts, 1, n_part, k, 4, 128, False, seed=11, device=device)
    assert moe.pick(16, 1, n_part, tokens * top_k, experts, 4, k=k, split_rule=moe.split_rule(torch.device(device))).split_k > 1
    index, _ = routing(tokens, top_k, experts, [0, 2], seed=5)
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(3)).half()
    sorted_ids, block_expert = moe.align(index.to(device), experts, 16)
    ref = reference(x, index, w_t, None, None, top_k, False)
    for split_k in (None, 1):
        out = moe.grouped_matmul(x.to(device), sorted_ids, block_expert, w, top_k, 16, split_k=split_k)
        assert ((out.double().cpu() - ref).norm() / ref.norm()).item() < TOL[torch.float16]


def test_pick_splits_k_only_at_decode_sizes():
    """Qwen3-30B-A3B experts (128, top-8; gate/up K 2048 = 16 chunks, down K 768 = 6) under the default table's
    rule on 132 SMs: 1 token splits both projections, 64 and 2048 tokens not at all; the SM count is an input
    (fewer SMs: fewer splits), the rule comes from the table, and more splits than chunks never happen."""
    rule = moe.split_rule(torch.device("cpu"))
    assert rule == table_default_rule()

    def split(tokens, proj, sms=132, rule=rule):
        parts, n_part, k = (2, 768, 2048) if proj == "first" else (1, 2048, 768)
        pairs = tokens * 8
        return moe.pick(moe.block_m_for(pairs, 128), parts, n_part, pairs, 128, sms, k=k, split_rule=rule).split_k

    assert split(1, "first") == 4 and split(1, "down") == 2
    assert split(2, "first") == 2
    assert split(64, "first") == split(64, "down") == split(2048, "first") == split(2048, "down") == 1
    assert split(1, "first", sms=66) == 2
    assert split(1, "first", rule={"split_k": 64, "min_chunks": 1}) == 16  # capped at the chunks
    assert moe.pick(16, 2, 768, 8, 128, 132).split_k == 1  # k unknown: no split


def table_default_rule():
    from lowbit.kernels.triton import table

    return table.default_table().moe_split


def test_empty_routing(device):
    """No tokens: nothing launched, empty outputs (a padded batch can give a layer zero rows)."""
    w, _, _ = random_stacked(3, 1, 16, 128, 4, 128, False, seed=0, device=device)
    index = torch.zeros(0, 2, dtype=torch.long, device=device)
    sorted_ids, block_expert = moe.align(index, 3, 16)
    assert sorted_ids.numel() == 0 and block_expert.numel() == 0
    out = moe.grouped_matmul(torch.zeros(0, 128, dtype=torch.float16, device=device), sorted_ids, block_expert, w, 2, 16)
    assert out.shape == (0, 16)


def test_custom_ops_schema_and_fake(device):
    """The custom ops' schemas and fake implementations (opcheck); test_grouped_experts.py compiles them in a model."""
    from lowbit.kernels import ops

    w, _, _ = random_stacked(4, 2, 16, 128, 4, 128, False, seed=3, device=device)
    index, weights = routing(3, 2, 4, [0, 1, 2, 3], seed=2)
    index = index.to(device)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0)).half().to(device)
    torch.library.opcheck(ops.moe_align, (index, 4, 16), test_utils=("test_schema", "test_faketensor"))
    sorted_ids, block_expert = ops.moe_align(index, 4, 16)
    args = (x, sorted_ids, block_expert, w.qweight, w.scales, w.zeros, None, weights.reshape(-1).half().to(device), 2, 4, 128, True, 16)
    torch.library.opcheck(ops.moe_quant_matmul, args, test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.moe_quant_matmul, (*args, 2), test_utils=("test_schema", "test_faketensor"))  # split_k given


# ---------------------------------------------------------------- GPU: real widths, graphs, a second device


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64, 300])  # block_m 16 (unpack4 at 4 bits) and 64 (magic dot)
@pytest.mark.parametrize("bits,group,dtype", [(4, 128, torch.float16), (4, 128, torch.bfloat16), (4, 32, torch.float16),
                                              (8, 128, torch.float16), (2, 64, torch.bfloat16)])
def test_gpu_real_widths(tokens, bits, group, dtype):
    experts, top_k, k, n_part = 16, 4, 512, 256
    w, w_t, _ = random_stacked(experts, 2, n_part, k, bits, group, False, seed=tokens + bits, device="cuda")
    index, _ = routing(tokens, top_k, experts, list(range(experts - 3)), seed=tokens)
    block_m = moe.block_m_for(tokens * top_k, experts)
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(0)).to(dtype)
    sorted_ids, block_expert = moe.align(index.cuda(), experts, block_m)
    check_align(index, experts, block_m, sorted_ids, block_expert)
    out = torch.full((tokens * top_k, 2 * n_part), float("nan"), dtype=dtype, device="cuda")
    moe.grouped_matmul(x.cuda(), sorted_ids, block_expert, w, top_k, block_m, out=out)
    ref = reference(x, index, w_t, None, None, top_k, False)
    assert torch.isfinite(out).all()
    assert ((out.double().cpu() - ref).norm() / ref.norm()).item() < TOL[dtype]


@pytest.mark.gpu
def test_gpu_cuda_graph_replays_new_routing():
    """Captured once, replayed with another routing written into the same index tensor: sizes never depend
    on the routing, so the graph computes the new one (no host sync inside)."""
    experts, top_k, k, n_part, tokens = 8, 2, 256, 64, 5
    w, w_t, _ = random_stacked(experts, 2, n_part, k, 4, 128, False, seed=5, device="cuda")
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(0)).half().cuda()
    index = torch.zeros(tokens, top_k, dtype=torch.long, device="cuda")
    block_m = moe.block_m_for(tokens * top_k, experts)

    def step():
        s, b = moe.align(index, experts, block_m)
        return moe.grouped_matmul(x, s, b, w, top_k, block_m)

    first, _ = routing(tokens, top_k, experts, [0, 1], seed=1)
    index.copy_(first)
    step()  # compiles the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed, used in ((2, [3, 4, 5, 6, 7]), (3, list(range(experts)))):
        new, _ = routing(tokens, top_k, experts, used, seed=seed)
        index.copy_(new)
        graph.replay()
        ref = reference(x.cpu(), new, w_t, None, None, top_k, False)
        assert ((out.double().cpu() - ref).norm() / ref.norm()).item() < TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("workspace_ready", [True, False])
def test_gpu_split_k_in_cuda_graph(workspace_ready):
    """The K split captured in a CUDA graph and replayed with new routings: with the workspace already large
    enough the splits meet inside the launch; with none yet (capture cannot allocate it) the launch falls back
    to the zeroed fp32 buffer, captured too."""
    from lowbit.kernels.triton import splitk

    experts, top_k, k, n_part, tokens = 8, 2, 1024, 64, 2
    w, w_t, _ = random_stacked(experts, 1, n_part, k, 4, 128, False, seed=9, device="cuda")
    x = torch.randn(tokens * top_k, k, generator=torch.Generator().manual_seed(0)).half().cuda()
    index = torch.zeros(tokens, top_k, dtype=torch.long, device="cuda")
    weights = torch.rand(tokens * top_k, generator=torch.Generator().manual_seed(1)).half().cuda()
    dev = torch.device("cuda", torch.cuda.current_device())

    def step():
        s, b = moe.align(index, experts, 16)
        return moe.grouped_matmul(x, s, b, w, 1, 16, weights=weights, split_k=4)

    index.copy_(routing(tokens, top_k, experts, [0, 1], seed=1)[0])
    step()  # compiles the kernels (and grows the workspace) outside the capture
    torch.cuda.synchronize()
    if not workspace_ready:
        splitk._retired.append(splitk._workspaces.pop(dev))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    assert (dev in splitk._workspaces) == workspace_ready
    for seed, used in ((2, [3, 4, 5]), (3, list(range(experts)))):
        new, _ = routing(tokens, top_k, experts, used, seed=seed)
        index.copy_(new)
        graph.replay()
        ref = reference(x.cpu(), new, w_t, None, weights.cpu(), 1, False)
        assert ((out.double().cpu() - ref).norm() / ref.norm()).item() < TOL[torch.float16]


@pytest.mark.multigpu
def test_gpu_second_device_while_first_is_current():
    experts, top_k, k, n_part, tokens = 8, 2, 256, 64, 6
    w, w_t, _ = random_stacked(experts, 2, n_part, k, 4, 128, True, seed=7, device="cuda:1")
    index, _ = routing(tokens, top_k, experts, list(range(experts)), seed=4)
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(0)).half()
    with torch.cuda.device(0):
        s, b = moe.align(index.to("cuda:1"), experts, 16)
        out = moe.grouped_matmul(x.to("cuda:1"), s, b, w, top_k, 16)
    ref = reference(x, index, w_t, w.bias.cpu(), None, top_k, False)
    assert out.device == torch.device("cuda:1")
    assert ((out.double().cpu() - ref).norm() / ref.norm()).item() < TOL[torch.float16]
