"""lowbit.load(..., quant_lm_head=...): a full-precision lm_head RTN-quantized at load onto QuantLinear."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.kernels.linear import QuantLinear
from lowbit.quant import quantize_weight
from tests.conftest import save_tiny_llama

VOCAB, HIDDEN = 320, 128


def _export(root, tie: bool):
    """A tiny Llama (fp head kept fp: lowbit's default) quantized W4 g32 by RTN; returns (fp model, export folder)."""
    fp = save_tiny_llama(root / "fp", hidden=HIDDEN, intermediate=256, vocab=VOCAB, tie=tie, seed=11)
    out = root / "q"
    lowbit.quantize(str(root / "fp"), "rtn", lowbit.Scheme(bits=4, group_size=32, sym=False),
                    run=lowbit.RunConfig(output_dir=str(out), device="cpu"), progress=False)
    return fp, out


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("qhead"), tie=False)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("qhead_tied"), tie=True)


def _head_reference(hidden: torch.Tensor, w: torch.Tensor, scheme: lowbit.Scheme) -> torch.Tensor:
    """float64 logits [B, T, V] from the RTN-dequantized head: W_hat = scale * (q - zero) of the fp W [V, H]."""
    w_hat = quantize_weight(w.float(), scheme).dequantize().double()  # [V, H]
    return hidden.double() @ w_hat.t()


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("scheme", [None, lowbit.Scheme(bits=4, group_size=32, sym=False), lowbit.Scheme(bits=8, group_size=64)])
def test_logits_match_rtn_head_reference(untied, scheme):
    fp, out = untied
    plain = lowbit.load(str(out))
    model = lowbit.load(str(out), quant_lm_head=True if scheme is None else scheme)
    used = scheme or lowbit.Scheme()
    head = model.lm_head
    assert isinstance(head, QuantLinear) and (head.bits, head.group_size) == (used.bits, used.group_size)
    with torch.no_grad():
        hidden = model.model(IDS).last_hidden_state  # [2, 12, H]: the blocks are the export's, untouched
        torch.testing.assert_close(hidden, plain.model(IDS).last_hidden_state, rtol=0, atol=0)
        logits = model(IDS).logits
        ref = _head_reference(hidden, fp.lm_head.weight, used)
        full = plain(IDS).logits
    torch.testing.assert_close(logits.double(), ref, rtol=1e-5, atol=1e-5)
    assert (logits - full).abs().max() > 1e-4  # the head really changed: the reference is not the fp head's


def test_tied_head_untied_embedding_kept(tied):
    fp, out = tied
    plain = lowbit.load(str(out))
    assert plain.lm_head.weight is plain.model.embed_tokens.weight  # the export keeps the tie
    model = lowbit.load(str(out), quant_lm_head=True)
    embed = model.model.embed_tokens.weight
    torch.testing.assert_close(embed, fp.model.embed_tokens.weight, rtol=0, atol=0)  # still full precision
    assert isinstance(model.lm_head, QuantLinear) and not model.config.tie_word_embeddings
    model.tie_weights()  # what transformers calls on re-tying: must not put the embedding back into the head
    assert isinstance(model.lm_head, QuantLinear) and "weight" not in dict(model.lm_head.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model.model.embed_tokens(IDS), plain.model.embed_tokens(IDS), rtol=0, atol=0)
        hidden = model.model(IDS).last_hidden_state
        torch.testing.assert_close(hidden, plain.model(IDS).last_hidden_state, rtol=0, atol=0)
        ref = _head_reference(hidden, fp.model.embed_tokens.weight, lowbit.Scheme())
        torch.testing.assert_close(model(IDS).logits.double(), ref, rtol=1e-5, atol=1e-5)


def test_default_keeps_head_full_precision(untied):
    _, out = untied
    assert type(lowbit.load(str(out)).lm_head) is torch.nn.Linear


def test_bad_value_is_one_line_error(untied):
    _, out = untied
    with pytest.raises(LowbitError, match="quant_lm_head"):
        lowbit.load(str(out), quant_lm_head="w4")
