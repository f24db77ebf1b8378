"""Bad input: one line naming the problem and the fix, non-zero exit, no traceback, no output left behind."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import save_tiny_llama


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("lowbit: error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_tiny_llama(path, layers=1)
    return path


def quantize(model, out, *extra):
    return run_cli("quantize", model, "--method", "rtn", "--output_dir", out, "--device", "cpu", *extra)


def test_missing_and_empty_model_path(tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(quantize(tmp_path / "nope", out), "does not exist")
    assert_one_line_error(quantize("", out), "empty model path")
    assert not out.exists() and not list(tmp_path.glob("*partial*"))


def test_folder_without_config_or_weights(tmp_path, tiny):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(quantize(empty, tmp_path / "o"), "no config.json")
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny / "config.json").read_text())
    assert_one_line_error(quantize(no_weights, tmp_path / "o"), "no *.safetensors weights")


def test_corrupt_safetensors(tmp_path, tiny):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tiny / "config.json").read_text())
    (bad / "model.safetensors").write_bytes((tiny / "model.safetensors").read_bytes()[:1000])
    assert_one_line_error(quantize(bad, tmp_path / "o"), "corrupt safetensors file model.safetensors")
    assert not (tmp_path / "o").exists()


def test_unknown_architecture(tmp_path, tiny):
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((tiny / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (other / "config.json").write_text(json.dumps(config))
    (other / "model.safetensors").write_bytes((tiny / "model.safetensors").read_bytes())
    assert_one_line_error(quantize(other, tmp_path / "o"), "unknown architecture FancyNewForCausalLM", "ArchSpec")


@pytest.mark.parametrize("flags,needle", [
    (["--group_size", "0"], "group_size=0 is invalid"),
    (["--group-size", "-4"], "group_size=-4 is invalid"),
    (["--bits", "5"], "bits=5 is not supported"),
    (["--scheme", "W4A8"], "unknown scheme"),
    (["--format", "onnx"], "unsupported export format 'onnx'"),
])
def test_bad_scheme_flags(tmp_path, tiny, flags, needle):
    assert_one_line_error(quantize(tiny, tmp_path / "o", *flags), needle)
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_overwrite(tmp_path, tiny):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(quantize(tiny, out), "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    ok = quantize(tiny, out, "--overwrite")
    assert ok.returncode == 0, ok.stderr
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()


def test_nan_weights(tmp_path, tiny):
    nan = tmp_path / "nan"
    nan.mkdir()
    (nan / "config.json").write_text((tiny / "config.json").read_text())
    tensors = load_file(tiny / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, nan / "model.safetensors")
    assert_one_line_error(quantize(nan, tmp_path / "o"), "model.layers.0.mlp.up_proj.weight contains NaN or inf")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.lowbit-partial"))


def test_calibration_text_too_short(tmp_path):
    from transformers import AutoTokenizer  # noqa: F401  (import check only)

    from lowbit.calib.samples import calibration_windows
    from lowbit.config import CalibConfig
    from lowbit.errors import LowbitError

    class WordTokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(range(len(text.split())))}

    text = "word " * 1000  # 1000 tokens -> 3 windows of 300
    with pytest.raises(LowbitError) as err:
        calibration_windows(WordTokenizer(), text, CalibConfig(nsamples=8, seqlen=300))
    assert "makes only 3 samples" in str(err.value) and "--allow_fewer_samples" in str(err.value)
    windows = calibration_windows(WordTokenizer(), text, CalibConfig(nsamples=8, seqlen=300, allow_fewer=True))
    assert windows.shape == (3, 300)


def test_eval_of_missing_folder(tmp_path):
    assert_one_line_error(run_cli("eval", tmp_path / "nothing", "--ppl"), "does not exist")
