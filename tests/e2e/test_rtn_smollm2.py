"""RTN W4 g128 asym on the real default model (SmolLM2-135M), ANCHORS protocol.

Our export, loaded back through lowbit.load, must give the perplexity of an independent min/max
round-to-nearest with a partial last group (576 = 4 x 128 + 64) applied in memory to the fp model,
and land within 2% of the auto-round package's plain RTN (33.02, measured in ANCHORS.md).
"""

import pytest
import torch

import lowbit
from lowbit.calib.corpora import load_text
from lowbit.eval import generate, perplexity
from tests.reference import reference_rtn_model

pytestmark = pytest.mark.slow
AUTO_ROUND_RTN_PPL = 33.02
SAME_WINDOWS = 8  # windows on which ours and the independent reference are compared (the anchor takes all 40)


def test_summary_counts_every_block_linear(smollm2_rtn):
    _, summary = smollm2_rtn(4, 128, False)
    assert len(summary.quantized) == 30 * 7
    assert set(summary.kept_fp) == {"lm_head", "model.embed_tokens"}
    assert summary.peak_rss > 0 and summary.seconds > 0


def test_perplexity_matches_independent_rtn(smollm2_rtn):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.model.source import resolve_model

    out, _ = smollm2_rtn(4, 128, False)
    text = load_text("austen-eval")
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = lowbit.load(out)
    ours = perplexity(model, tokenizer, text)  # the ANCHORS protocol: 40 windows of 512
    ours_first = perplexity(model, tokenizer, text, max_windows=SAME_WINDOWS)
    fp = AutoModelForCausalLM.from_pretrained(resolve_model("default"), dtype=torch.float32).eval()
    reference = perplexity(reference_rtn_model(fp, 4, 128, False), tokenizer, text, max_windows=SAME_WINDOWS)
    print(f"RTN W4 g128 asym perplexity: lowbit {ours:.3f} (first {SAME_WINDOWS} windows {ours_first:.3f}, independent reference there "
          f"{reference:.3f}), auto-round {AUTO_ROUND_RTN_PPL}")
    assert abs(ours_first - reference) / reference < 0.005
    assert abs(ours - AUTO_ROUND_RTN_PPL) / AUTO_ROUND_RTN_PPL < 0.02


def test_quantized_model_still_answers(smollm2_rtn):
    from transformers import AutoTokenizer

    out, _ = smollm2_rtn(4, 128, False)
    answer = generate(lowbit.load(out), AutoTokenizer.from_pretrained(out), "What is the capital of France?", max_new_tokens=12)
    assert "Paris" in answer, answer


def test_cli_quantize_eval_generate(smollm2_cli_g64):
    import subprocess
    import sys

    out, q = smollm2_cli_g64  # `lowbit quantize default --method rtn --scheme W4A16 --group_size 64 --asym --format auto_round`
    run = lambda *a: subprocess.run([sys.executable, "-m", "lowbit.cli", *map(str, a)], capture_output=True, text=True, timeout=900)  # noqa: E731
    assert q.returncode == 0, q.stderr
    assert "quantized 210 linears" in q.stdout and "peak RSS" in q.stdout
    e = run("eval", out, "--ppl", "--windows", "4")
    assert e.returncode == 0 and "perplexity" in e.stdout, e.stderr
    ppl = float(e.stdout.split("perplexity")[1].split()[0])
    assert 10 < ppl < 60, e.stdout
    g = run("generate", out, "--prompt", "Name the largest planet.", "--max_new_tokens", "16")
    assert g.returncode == 0 and g.stdout.strip(), g.stderr
