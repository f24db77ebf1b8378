"""End to end: AutoRound on the real default model (SmolLM2-135M) with reduced settings beats RTN.

W3 g128 asym, where RTN loses most (ANCHORS: RTN ~100 ppl vs fp 25.5), so even a few iterations on a
few short samples must show; both exports are read back with `lowbit.load` and scored with
`lowbit.eval.perplexity` on the held-out text (Pride and Prejudice), on fewer, shorter windows than the
full protocol to stay within a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import pytest

import lowbit
from lowbit.calib.corpora import load_text
from lowbit.eval.perplexity import perplexity

pytestmark = pytest.mark.slow

SCHEME = lowbit.Scheme(bits=3, group_size=128, sym=False)
CALIB = lowbit.CalibConfig(dataset="austen", nsamples=8, seqlen=256, batch_size=4)


def quantize_and_score(method, out, text) -> tuple[float, object]:
    from transformers import AutoTokenizer

    summary = lowbit.quantize("default", method, SCHEME, calib=CALIB, run=lowbit.RunConfig(output_dir=str(out), device="cpu"), progress=False)
    model = lowbit.load(str(out))
    ppl = perplexity(model, AutoTokenizer.from_pretrained(out), text, window=256, max_windows=4)
    return ppl, summary


def test_autoround_beats_rtn_on_smollm2(tmp_path):
    text = load_text("austen-eval")
    rtn_ppl, _ = quantize_and_score("rtn", tmp_path / "rtn", text)
    ar_ppl, summary = quantize_and_score(lowbit.AutoRoundConfig(iters=15, seed=0), tmp_path / "autoround", text)
    assert len(summary.block_losses) == 30  # every block trained (and logged)
    assert ar_ppl < 0.8 * rtn_ppl, (ar_ppl, rtn_ppl)  # held-out perplexity of the two exports, through lowbit.load
