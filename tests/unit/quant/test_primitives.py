"""The grid against an independent per-row, per-group loop written from the definition."""

import math

import pytest
import torch

from lowbit.config import Scheme
from lowbit.quant import compute_qparams, fake_quantize, quantize_weight
from tests.reference import reference_rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_fake_quantize_matches_reference_with_partial_groups(bits, group_size, sym):
    torch.manual_seed(0)
    w = torch.randn(6, 200)  # 200 = 6*32 + 8 and 128 + 72: partial last groups
    got = fake_quantize(w, Scheme(bits, group_size, sym)).double()
    want = reference_rtn(w, bits, group_size, sym)
    # torch rounds half to even, python's round too: identical codes, float32 vs float64 arithmetic only
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_quant_result_shapes_and_ranges():
    w = torch.randn(10, 576)
    r = quantize_weight(w, Scheme(4, 128, False))
    assert r.codes.shape == (10, 576) and r.codes.dtype == torch.uint8 and int(r.codes.max()) <= 15
    assert r.scale.shape == (10, 5) and r.zero.shape == (10, 5)  # 576 = 4 x 128 + 64
    assert torch.equal(r.scale, r.scale.half().float())  # fp16-representable, as every format stores it
    err = (r.dequantize() - w).abs()
    assert err.max() <= r.scale.max() * 0.5 + 1e-6  # round-to-nearest: at most half a step


def test_minmax_factors_shrink_the_range_and_v_moves_rounding():
    torch.manual_seed(1)
    w = torch.randn(4, 64)
    scheme = Scheme(4, 32, False)
    s1, _ = compute_qparams(w, scheme)
    s2, _ = compute_qparams(w, scheme, min_scale=torch.full((4, 2), 0.8), max_scale=torch.full((4, 2), 0.8))
    assert (s2 < s1).all()
    v = torch.full_like(w, 0.49)
    assert not torch.equal(fake_quantize(w, scheme, v=v), fake_quantize(w, scheme))


def test_gradients_flow_through_straight_through_rounding():
    w = torch.randn(4, 64)
    v = torch.zeros_like(w, requires_grad=True)
    mx = torch.ones(4, 2, requires_grad=True)
    loss = (fake_quantize(w, Scheme(4, 32, False), v=v, max_scale=mx) - w).pow(2).sum()
    loss.backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert mx.grad is not None and math.isfinite(mx.grad.sum().item())


def test_bad_schemes_are_refused_with_one_line():
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match="bits=5 is not supported"):
        Scheme(5, 128)
    with pytest.raises(LowbitError, match="group_size=0 is invalid"):
        Scheme(4, 0)
    with pytest.raises(LowbitError, match="group_size=-2 is invalid"):
        Scheme(4, -2)
