"""GPTQ: the pure math on tiny layers against a straightforward reference, and on a tiny random Llama."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import lowbit
from tests.conftest import save_tiny_model_with_tokenizer
from lowbit.algorithms.rtn import quantize_block as rtn_block
from lowbit.algorithms.gptq import PANEL, accumulate_hessian, gptq_quantize, inverse_hessian_factor, quantize_block, sequential_stages
from lowbit.arch import spec_for
from tests.engine_helpers import block_outputs, capture
from tests.engine_helpers import make_ctx as engine_ctx
from lowbit.config import GptqConfig, Scheme
from lowbit.quant.primitives import compute_qparams, quantize_weight


def correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """[n, k] inputs with correlated channels of unequal size, like a real layer's (where GPTQ gains)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    return (z @ mix) * torch.linspace(0.2, 3.0, k)


def output_error(x, w, w_hat) -> float:
    return (x @ (w - w_hat).t()).pow(2).sum().item()


def reference_gptq(w: torch.Tensor, h: torch.Tensor, scheme: Scheme, damp_percent: float = 0.01):
    """GPTQ written the slow, obvious way (OBS updates of an explicit inverse, one column at a time):
    round column j on its group's grid (computed from the current weights when the group starts), move
    the remaining columns by -err * Hinv[j, j+1:] / Hinv[j, j], then eliminate j from Hinv."""
    W = w.double().clone()
    H = h.double() + damp_percent * h.diagonal().mean().double() * torch.eye(h.shape[0], dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    n, k = W.shape
    gs = scheme.group_size_for(k)
    codes = torch.zeros(n, k)
    scales, zeros = [], []
    for j in range(k):
        if j % gs == 0:
            s, z = compute_qparams(W[:, j : j + gs].float(), scheme)
            scales.append(s[:, 0])
            zeros.append(z[:, 0])
            s, z = s[:, 0].double(), z[:, 0].double()
        q = ((W[:, j] / s).round() + z).clamp(0, scheme.maxq)
        codes[:, j] = q.float()
        err = (W[:, j] - s * (q - z)) / Hinv[j, j]
        W[:, j + 1 :] -= err[:, None] * Hinv[j, j + 1 :][None, :]
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    return codes, torch.stack(scales, 1), torch.stack(zeros, 1)


def factor64(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The textbook factor in float64: upper Cholesky of the explicit inverse of H + damp I."""
    h = h.double() + damp * torch.eye(h.shape[0], dtype=torch.float64)
    return torch.linalg.cholesky(torch.linalg.inv(h), upper=True)


def test_inverse_factor_is_the_upper_cholesky_of_the_inverse():
    # K past two panels and not a multiple of one: the panel cuts and the ragged last panel are exercised
    k = 2 * PANEL + 300
    x = correlated_inputs(3 * k, k)
    h = 2 * x.t() @ x / x.shape[0]
    u = inverse_hessian_factor(h, 0.01)
    ref = factor64(h, 0.01 * float(h.diagonal().mean()))
    assert torch.equal(u.tril(-1), torch.zeros_like(u).tril(-1))  # upper triangular
    assert float((u.double() - ref).abs().max() / ref.abs().max()) < 1e-4


def test_inverse_factor_raises_dampening_until_positive_definite():
    # eigenvalues down to -3% of the mean diagonal: 1% dampening fails, 10% is the first that holds
    k = 64
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    eig = torch.linspace(-0.03, 2.0, k, dtype=torch.float64)
    h = (q * eig) @ q.t()
    u = inverse_hessian_factor(h.float(), 0.01)
    ref = factor64(h, 0.1 * float(h.diagonal().mean()))
    assert float((u.double() - ref).abs().max() / ref.abs().max()) < 1e-4


def test_hessian_accumulates_to_two_xtx_over_n():
    x = torch.randn(3, 7, 5)
    h, n = None, 0
    for chunk in x:  # [7, 5] at a time, in three calls
        h, n = accumulate_hessian(h, n, chunk)
    flat = x.reshape(-1, 5)
    assert n == 21
    torch.testing.assert_close(h, 2 * flat.t() @ flat / 21)


def test_16bit_inputs_give_the_float64_hessian_of_their_values():
    """bf16 / fp16 inputs (a GPU run's blocks) take the 16-bit GEMM path (`gram`; on the CPU the float32 GEMM
    of the upcast values): H is 2 X^T X / n of the 16-bit values as computed in float64, to float32 rounding."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(3, 64, 48, generator=g).to(dtype)
        h, n = None, 0
        for chunk in x:
            h, n = accumulate_hessian(h, n, chunk)
        flat = x.reshape(-1, 48).double()
        assert n == 192 and h.dtype == torch.float32
        torch.testing.assert_close(h.double(), 2 * flat.t() @ flat / 192, rtol=1e-5, atol=1e-6)


def test_weighted_hessian_is_the_weighted_mean_over_every_call():
    """Row weights (an expert's routed rows while every token runs through it): 2 sum w x x^T / sum w in
    float64 over all calls, zero-weight rows contributing nothing, n the weight total."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 7, 5, generator=g, dtype=torch.float64), torch.rand(3, 7, generator=g, dtype=torch.float64)
    w[1, :4] = 0
    h, n = None, 0.0
    for chunk, wc in zip(x, w):
        h, n = accumulate_hessian(h, n, chunk.float(), wc.float())
    flat, wf = x.reshape(-1, 5), w.reshape(-1)
    assert abs(n - float(wf.sum())) < 1e-5
    torch.testing.assert_close(h.double(), 2 * (flat.t() * wf) @ flat / wf.sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block_size", [128, 3])  # 3: groups of 4 straddle lazy blocks (pending updates)
def test_matches_straightforward_reference_on_a_tiny_layer(block_size):
    torch.manual_seed(0)
    layer = torch.nn.Linear(10, 6)  # K=10 with groups of 4: 4 + 4 + a partial 2
    x = correlated_inputs(64, 10)
    h, _ = accumulate_hessian(None, 0, x)
    scheme = Scheme(3, 4, sym=False)
    result, _ = gptq_quantize(layer.weight, h, scheme, block_size=block_size)
    codes, scales, zeros = reference_gptq(layer.weight.detach(), h, scheme)
    torch.testing.assert_close(result.scale, scales, rtol=1e-5, atol=0)
    assert torch.equal(result.zero.float(), zeros)
    assert (result.codes.float() == codes).float().mean() >= 0.98  # float32 vs float64: a rare tie may flip
    assert result.codes.dtype == torch.uint8 and result.scale.shape == (6, 3) and result.zero.dtype == torch.uint8


@pytest.mark.parametrize("scheme", [Scheme(3, 32, sym=False), Scheme(4, 32, sym=True), Scheme(2, -1, sym=False)])
@pytest.mark.parametrize("act_order", [False, True])
def test_beats_rtn_on_its_calibration_inputs(scheme, act_order):
    torch.manual_seed(1)
    layer = torch.nn.Linear(96, 48)  # 96 = 3 groups of 32
    x = correlated_inputs(512, 96, seed=2)
    h, _ = accumulate_hessian(None, 0, x)
    w = layer.weight.detach()
    result, _ = gptq_quantize(w, h, scheme, act_order=act_order)
    rtn = quantize_weight(w, scheme)
    assert output_error(x, w, result.dequantize()) < 0.8 * output_error(x, w, rtn.dequantize())
    if act_order:  # static groups: the grid is RTN's grid on the original weight
        assert torch.equal(result.scale, rtn.scale) and torch.equal(result.zero, rtn.zero)


def test_dead_inputs_are_zeroed_not_nan():
    torch.manual_seed(2)
    w = torch.randn(6, 8)
    x = correlated_inputs(32, 8)
    x[:, 3] = 0  # input channel 3 never fires
    h, _ = accumulate_hessian(None, 0, x)
    result, loss = gptq_quantize(w, h, Scheme(4, 4, sym=False))
    w_hat = result.dequantize()
    assert torch.isfinite(w_hat).all() and loss == loss
    assert torch.all(w_hat[:, 3] == 0)  # the dead column is quantized as zero


# ---------------------------------------------------------------- on a block


def tiny_llama(heads=4, kv_heads=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
        vocab_size=256, max_position_embeddings=128, architectures=["LlamaForCausalLM"],
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def captured():
    model = tiny_llama()
    windows = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    return model, capture(model, windows)


def make_ctx(model, inputs, scheme):
    return engine_ctx(model, inputs, scheme)


def block_mse(ctx, fp, results) -> float:
    for n, r in results.items():
        ctx.linears[n].weight.data = r.dequantize()
    return F.mse_loss(block_outputs(ctx), fp).item()


def test_true_sequential_stages_follow_the_forward(captured):
    model, inputs = captured
    ctx = make_ctx(copy.deepcopy(model), inputs, Scheme())
    assert sequential_stages(ctx) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"],
    ]


@pytest.mark.parametrize("config", [GptqConfig(), GptqConfig(act_order=False), GptqConfig(true_sequential=False)])
def test_block_output_error_below_rtn(captured, config):
    model, inputs = captured
    scheme = Scheme(3, 32, sym=False)
    fp = block_outputs(make_ctx(model, inputs, Scheme()))
    rtn_ctx = make_ctx(copy.deepcopy(model), inputs, scheme)
    rtn = block_mse(rtn_ctx, fp, rtn_block(rtn_ctx, None))
    ctx = make_ctx(copy.deepcopy(model), inputs, scheme)
    results = quantize_block(ctx, config)
    assert set(results) == set(ctx.linears)
    assert block_mse(ctx, fp, results) < 0.8 * rtn


@pytest.mark.parametrize("act_order", [False, True])
def test_linears_sharing_an_input_solved_as_stacked_rows_get_their_own_codes(captured, monkeypatch, act_order):
    """q/k/v (and gate/up) share one Hessian and are solved as one weight of their stacked rows: every linear
    gets exactly the codes, scales and zeros of its own solve against that Hessian (the block's real stage
    Hessians, true sequential), with one factorisation and column loop per stage instead of one per linear."""
    import lowbit.algorithms.gptq as gptq

    model, inputs = captured
    scheme, config = Scheme(4, 32, sym=False), GptqConfig(act_order=act_order)
    stacked_groups = []
    real_solve = gptq.gptq_quantize_many

    def spy(w, h, *args):
        if w.shape[0] == 1 and w.shape[1] not in {l.out_features for l in ctx.linears.values()}:
            stacked_groups.append(w.shape[1])  # rows of several linears
        return real_solve(w, h, *args)

    ctx = make_ctx(copy.deepcopy(model), inputs, scheme)
    monkeypatch.setattr(gptq, "gptq_quantize_many", spy)
    stacked = quantize_block(ctx, config)
    real_groups = gptq.solve_groups
    monkeypatch.setattr(gptq, "solve_groups", lambda *a: [[(n,)] for g in real_groups(*a) for unit in g for n in unit])  # each linear its own solve
    alone = quantize_block(make_ctx(copy.deepcopy(model), inputs, scheme), config)
    assert sorted(stacked_groups) == [64 + 32 + 32, 2 * 160]  # q/k/v (kv_heads 2 of 4: 32 rows each), gate/up
    for name in alone:
        for f in ("codes", "scale", "zero"):
            assert torch.equal(getattr(stacked[name], f), getattr(alone[name], f)), (name, f)


# ---------------------------------------------------------------- end to end


def test_quantize_and_load_tiny_model(tmp_path):
    text = " ".join(f"The {w} walked to the {v} and said {n} words." for w, v, n in zip(["cat", "dog", "man", "girl"] * 60, ["shop", "park", "sea"] * 80, range(240)))
    (tmp_path / "calib.txt").write_text(text)
    src = tmp_path / "tiny"
    save_tiny_model_with_tokenizer(src, text)
    out = tmp_path / "q"
    calib = lowbit.CalibConfig(dataset=str(tmp_path / "calib.txt"), nsamples=4, seqlen=64, batch_size=2)
    summary = lowbit.quantize(str(src), lowbit.GptqConfig(), lowbit.Scheme(4, 64, False), calib=calib, run=lowbit.RunConfig(output_dir=str(out), device="cpu"), progress=False)
    assert summary.method == "gptq" and len(summary.quantized) == 2 * 7
    model = lowbit.load(out)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"
    from transformers import AutoModelForCausalLM

    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    x = torch.randint(0, 400, (1, 32))
    got, want = model(x).logits, fp(x).logits
    assert torch.isfinite(got).all()
    assert (got - want).norm() / want.norm() < 0.2  # close to fp, but quantized
    assert not torch.equal(got, want)


@pytest.mark.parametrize("act_order", [False, True])
def test_batched_solve_is_each_linears_own_solve(act_order):
    """gptq_quantize_many (the experts of a MoE block, solved together) gives every linear what its own
    solve gives: same codes and scales, with different weights and Hessians per linear and a partial group."""
    from lowbit.algorithms.gptq import gptq_quantize_many

    gen = torch.Generator().manual_seed(0)
    ws = torch.randn(3, 24, 40, generator=gen)  # K = 40: groups of 16, the last one 8 wide
    xs = torch.randn(3, 200, 40, generator=gen) * torch.linspace(0.1, 3, 40)
    hs = torch.stack([accumulate_hessian(None, 0, x)[0] for x in xs])
    hs[1, 5, :] = hs[1, :, 5] = 0  # a dead input on one of them
    scheme = Scheme(4, 16, sym=False)
    many, losses = gptq_quantize_many(ws, hs, scheme, block_size=16, act_order=act_order)
    for b in range(3):
        one, loss = gptq_quantize(ws[b], hs[b], scheme, block_size=16, act_order=act_order)
        assert torch.equal(many[b].codes, one.codes) and torch.equal(many[b].scale, one.scale) and torch.equal(many[b].zero, one.zero)
        assert losses[b] == pytest.approx(loss, rel=1e-5)
