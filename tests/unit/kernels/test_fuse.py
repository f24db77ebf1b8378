"""Fusing the linears that share an input (q/k/v, gate/up) into one QuantLinear: same outputs as separate ones."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.kernels.fuse import FusedSlice, fuse_shared_inputs
from lowbit.kernels.linear import QuantLinear
from tests.conftest import save_tiny_llama


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny Llama quantized W4 g32 by RTN."""
    root = tmp_path_factory.mktemp("fuse")
    model = save_tiny_llama(root / "fp", hidden=128, intermediate=256, vocab=256, seed=3)
    del model
    out = root / "q"
    lowbit.quantize(str(root / "fp"), "rtn", lowbit.Scheme(bits=4, group_size=32, sym=False), run=lowbit.RunConfig(output_dir=str(out), device="cpu"), progress=False)
    return out


def test_fused_model_matches_separate_layers(export):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    plain = lowbit.load(str(export))
    fused = lowbit.load(str(export), fuse=True)
    attn = fused.model.layers[0].self_attn
    assert all(isinstance(getattr(attn, n), FusedSlice) for n in ("q_proj", "k_proj", "v_proj"))
    assert isinstance(fused.model.layers[0].mlp.down_proj, QuantLinear)  # a group of one stays as it is
    layer = attn.q_proj.fused
    assert layer.out_features == attn.q_proj.out_features + attn.k_proj.out_features + attn.v_proj.out_features
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    assert attn.q_proj.shared.x is None and attn.q_proj.shared.y is None  # nothing held after the step
    # the fused layer is registered once: buffers are counted (and moved) once
    names = [n for n, _ in fused.named_buffers() if n.startswith("model.layers.0.self_attn.") and n.endswith("qweight")]
    assert names == ["model.layers.0.self_attn.q_proj.fused.qweight", "model.layers.0.self_attn.o_proj.qweight"]


def test_member_with_another_input_recomputes(export):
    plain = lowbit.load(str(export))
    fused = lowbit.load(str(export), fuse=True)
    a, b = torch.randn(3, 128), torch.randn(3, 128)
    p_attn, f_attn = plain.model.layers[1].self_attn, fused.model.layers[1].self_attn
    with torch.no_grad():
        q = f_attn.q_proj(a)
        k = f_attn.k_proj(b)  # not the input q saw: must not return a slice of q's step
        v = f_attn.v_proj(b)
        torch.testing.assert_close(q, p_attn.q_proj(a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k, p_attn.k_proj(b), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, p_attn.v_proj(b), rtol=1e-5, atol=1e-5)


def test_fused_model_under_compile(export):
    """The identity check and the held output trace into one graph (fullgraph) and give the eager logits."""
    fused = lowbit.load(str(export), fuse=True, cpu_cache_dequantized=False)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = fused(ids).logits
        compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(ids).logits, eager, rtol=1e-5, atol=1e-5)
    assert fused.model.layers[0].self_attn.q_proj.shared.x is None


def test_incompatible_groups_are_left_alone(export):
    """Members of different bit widths are not fused (a mixed-precision layer config)."""
    model = lowbit.load(str(export))
    mlp = model.model.layers[0].mlp
    mlp.up_proj.bits = 8  # as if the layer config had given it 8 bits
    fuse_shared_inputs(model, lowbit.arch.spec_for(model.config))
    assert isinstance(mlp.gate_proj, QuantLinear) and isinstance(mlp.up_proj, QuantLinear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, FusedSlice)


def test_concat_with_biases_matches_members():
    """Members with and without bias: the fused bias is theirs side by side (zeros where a member has none)."""
    from lowbit.kernels.fuse import concat_quantlinears

    gen = torch.Generator().manual_seed(5)
    layers = []
    for n, bias in ((40, True), (24, False), (16, True)):
        q = QuantLinear(96, n, 4, 32, bias=bias, dtype=torch.float32)
        q.qweight.copy_(torch.randint(-(2**31), 2**31 - 1, q.qweight.shape, generator=gen, dtype=torch.int64).to(torch.int32))
        q.qzeros.copy_(torch.randint(-(2**31), 2**31 - 1, q.qzeros.shape, generator=gen, dtype=torch.int64).to(torch.int32))
        q.scales.copy_(torch.rand(q.scales.shape, generator=gen) * 0.01 + 1e-3)
        if bias:
            q.bias.copy_(torch.randn(n, generator=gen))
        q.post_load()
        layers.append(q)
    fused = concat_quantlinears(layers)
    x = torch.randn(5, 96, generator=gen)
    torch.testing.assert_close(fused(x), torch.cat([q(x) for q in layers], dim=-1), rtol=1e-5, atol=1e-5)
