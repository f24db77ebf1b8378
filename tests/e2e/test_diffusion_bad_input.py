"""Bad input for pipelines, in tests/e2e/test_bad_input.py's style: one line naming the problem and the fix,
exit status 2, no traceback, nothing left beside the output, the source pipeline unchanged."""

from __future__ import annotations

import json
import shutil

import pytest

import lowbit
from lowbit.diffusion import PromptCalib, quantize_pipeline
from tests.diffusion_tiny import save_tiny_flux_pipeline
from tests.e2e.test_bad_input import assert_one_line, cli, leftovers, refused, snapshot


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("pipelines") / "flux")


@pytest.fixture
def broken(pipeline_dir, tmp_path):
    """A copy of the pipeline to break; checked unchanged by the refusal."""
    path = shutil.copytree(pipeline_dir, tmp_path / "broken")
    yield path


def refuse_cli(capsys, pipeline, out, *needles, extra=()):
    before = snapshot(pipeline)
    rc, err = cli(capsys, "quantize", pipeline, "--output_dir", out, "--device", "cpu", "--group_size", "32", *extra)
    assert_one_line(rc, err, *needles)
    assert leftovers(out) == []
    assert snapshot(pipeline) == before


def test_pipeline_without_a_supported_transformer(capsys, broken, tmp_path):
    index = json.loads((broken / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "UNet2DConditionModel"]
    (broken / "model_index.json").write_text(json.dumps(index))
    refuse_cli(capsys, broken, tmp_path / "out", "no transformer lowbit can quantize", "UNet2DConditionModel", "FluxTransformer2DModel")


def test_pipeline_missing_a_component(capsys, broken, tmp_path):
    shutil.rmtree(broken / "text_encoder_2")
    refuse_cli(capsys, broken, tmp_path / "out", "lacks its text_encoder_2 component", "copy the whole pipeline folder")


def test_pipeline_component_without_weights(capsys, broken, tmp_path):
    for f in (broken / "vae").glob("*.safetensors"):
        f.unlink()
    refuse_cli(capsys, broken, tmp_path / "out", "lacks its vae component", "weights are missing")


def test_empty_prompt_file(capsys, pipeline_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n  \n# only a comment\n")
    refuse_cli(capsys, pipeline_dir, tmp_path / "out", "holds no prompt", "one prompt per line", extra=("--method", "gptq", "--prompt_file", prompts))


def test_missing_prompt_file(capsys, pipeline_dir, tmp_path):
    refuse_cli(capsys, pipeline_dir, tmp_path / "out", "cannot read the prompt file", extra=("--method", "autoround", "--prompt_file", tmp_path / "nope.txt"))


def test_nan_in_a_transformer_block_is_found_before_any_work(capsys, broken, tmp_path):
    from safetensors.torch import load_file, save_file

    file = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(file)
    tensors["single_transformer_blocks.1.proj_out.weight"][0, 0] = float("nan")
    save_file(tensors, file)
    refuse_cli(capsys, broken, tmp_path / "out", "single_transformer_blocks.1.proj_out.weight", "NaN")


def test_bad_calibration_settings_and_data_parallel(pipeline_dir, tmp_path):
    refused(lambda: PromptCalib(steps=0), "steps=0 must be positive")
    refused(lambda: PromptCalib(height=16.0), "height")
    refused(lambda: quantize_pipeline(str(pipeline_dir), "rtn", run=lowbit.RunConfig(output_dir=str(tmp_path / "o")), calib=lowbit.CalibConfig()),
            "PromptCalib")


def test_awq_is_refused_before_any_work(capsys, pipeline_dir, tmp_path):
    refuse_cli(capsys, pipeline_dir, tmp_path / "out", "--method awq cannot quantize FluxTransformer2DModel", "AdaLN", "use --method gptq",
               extra=("--method", "awq", "--asym"))


def test_nproc_is_refused_for_pipelines(capsys, pipeline_dir, tmp_path):
    refuse_cli(capsys, pipeline_dir, tmp_path / "out", "--nproc is not supported for pipelines", extra=("--nproc", "2"))
