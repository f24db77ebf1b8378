"""Vision-language models and Gemma 4, end to end on tiny from_config checkpoints (CPU, offline).

Only the language model's blocks are quantized; vision towers, projectors, Gemma 4's per-layer tables and
lm_head stay in full precision and every export's config says so. The exports are loaded back by
lowbit.load and by transformers' own integration of the format (AutoModelForImageTextToText with
compressed-tensors), and the two must agree on the logits.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import lowbit
from lowbit.config import CalibConfig, RunConfig, Scheme
from lowbit.kernels.linear import QuantLinear
from tests.arch.tiny import TINY_TEXT as TEXT
from tests.arch.tiny import logits, save_tiny_checkpoint, tiny_text_file

VLMS = ["Gemma4ForConditionalGeneration", "Gemma3ForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "Qwen2VLForConditionalGeneration",
        "Qwen3VLForConditionalGeneration", "LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", "Mistral3ForConditionalGeneration"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return tiny_text_file(tmp_path_factory)


@pytest.mark.parametrize("arch", VLMS)
def test_vlm_text_blocks_quantized_tower_kept_and_transformers_agrees(arch, tmp_path, text_file):
    from transformers import AutoModelForImageTextToText

    src = tmp_path / "src"
    fp_model = save_tiny_checkpoint(arch, src, TEXT)
    out = tmp_path / "out"
    method = "gptq" if arch.startswith("Gemma4") else "rtn"  # a calibrated method through Gemma 4's per-layer inputs and shared KV
    summary = lowbit.quantize(str(src), method, Scheme(4, 32, sym=True), CalibConfig(dataset=str(text_file), nsamples=4, seqlen=32, batch_size=3),
                              RunConfig(output_dir=str(out), formats=("auto_round", "compressed-tensors"), device="cpu"), progress=False)
    assert summary.quantized and all(".language_model.layers." in n for n in summary.quantized)
    tower = [n for n, m in fp_model.named_modules() if isinstance(m, torch.nn.Linear) and ("vision" in n or "visual" in n or "projector" in n or "embed_vision" in n)]
    assert tower and set(tower) <= set(summary.kept_fp)

    ct = json.loads((out / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    ar = json.loads((out / "auto_round" / "config.json").read_text())["quantization_config"]
    assert set(tower) | {"lm_head"} <= set(ct["ignore"])
    assert set(tower) <= set(ar["extra_config"]) and ar["block_name_to_quantize"] == "model.language_model.layers"

    ids = torch.randint(4, 100, (2, 16), generator=torch.Generator().manual_seed(3))
    ours = logits(lowbit.load(out / "auto_round"), ids)
    theirs = logits(AutoModelForImageTextToText.from_pretrained(out / "compressed-tensors", dtype=torch.float32).eval(), ids)
    fp = logits(fp_model, ids)
    scale = fp.abs().max()
    assert (ours - theirs).abs().max() / scale < 2e-3  # the same quantized model, two independent loaders
    cosine = torch.nn.functional.cosine_similarity(ours.flatten(), fp.flatten(), dim=0)
    assert (ours - fp).abs().max() > 1e-4 * scale and cosine > 0.5, cosine  # quantized (W4 on a random model): near fp, not fp
    tower_ours = dict(lowbit.load(out / "compressed-tensors").named_modules())
    for name in tower:
        assert not isinstance(tower_ours[name], QuantLinear)  # nothing in the vision tower was converted


def test_gemma4_gptq_calibrates_through_per_layer_inputs_and_shared_kv(tmp_path, text_file):
    """GPTQ on Gemma 4 (per-layer inputs, KV-sharing layers, batch 3 < 6 samples) beats RTN on its own
    calibration windows: the Hessians saw the inputs the blocks really get."""
    from transformers import AutoTokenizer

    src = tmp_path / "src"
    fp_model = save_tiny_checkpoint("Gemma4ForCausalLM", src, TEXT)
    ids = AutoTokenizer.from_pretrained(src)(TEXT, add_special_tokens=False, return_tensors="pt").input_ids[:, : 6 * 32].reshape(6, 32)
    fp = logits(fp_model, ids)
    errors = {}
    for method in ("rtn", "gptq"):
        out = tmp_path / method
        lowbit.quantize(str(src), method, Scheme(4, 32, sym=True), CalibConfig(dataset=str(text_file), nsamples=6, seqlen=32, batch_size=3),
                        RunConfig(output_dir=str(out), device="cpu"), progress=False)
        errors[method] = torch.nn.functional.mse_loss(logits(lowbit.load(out), ids), fp).item()
    assert errors["gptq"] < errors["rtn"], errors


def test_image_calibration_replays_exactly_and_the_export_answers_about_an_image(tmp_path):
    """Image-text samples (vision tower and projector run before block 0, padded to seqlen) replayed
    block by block equal the full forward per sample at batch 1 and 3; GPTQ calibrated on them exports a
    model that `lowbit generate --image` runs."""
    import subprocess
    import sys

    from lowbit.arch import spec_for
    from lowbit.calib.capture import capture_block_inputs
    from lowbit.calib.images import image_samples
    from lowbit.engine import BlockEngine
    from tests.arch.tiny import save_tiny_llava_with_processor, write_images

    src = tmp_path / "src"
    model = save_tiny_llava_with_processor(src, TEXT)
    images = tmp_path / "images"
    paths = write_images(images, 4)
    samples = image_samples(src, str(images), nsamples=4, seqlen=64)
    spec = spec_for(model.config)
    want = []
    hook = model.get_submodule(spec.post_block[0]).register_forward_hook(lambda m, args, out: want.append(args[0].clone()))
    with torch.no_grad():
        for s in samples:
            model(**s, use_cache=False)
    hook.remove()
    plan = capture_block_inputs(model, model.get_submodule(spec.blocks), samples, "cpu", "cpu", spec.state_kwargs)
    assert not plan.refusal
    for batch_size in (1, 3):
        engine = BlockEngine(plan, "cpu", "cpu", batch_size)
        stream = engine.stream()
        for i, block in enumerate(model.get_submodule(spec.blocks)):
            stream = engine.propagate(block, i, stream)
        for got, ref in zip(stream.hidden, want):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)

    out = tmp_path / "out"
    lowbit.quantize(str(src), "gptq", Scheme(4, 32, sym=True), CalibConfig(images=str(images), nsamples=4, seqlen=64, batch_size=2),
                    RunConfig(output_dir=str(out), device="cpu"), progress=False)
    assert (out / "processor_config.json").is_file() and (out / "chat_template.jinja").is_file()
    proc = subprocess.run([sys.executable, "-m", "lowbit.cli", "generate", str(out), "--image", str(paths[0]), "--prompt", "what is it", "--max_new_tokens", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("case", ["text_only_model", "bad_image", "no_processor", "generate_image_text_model"])
def test_image_bad_input_is_one_line_and_leaves_nothing(case, tmp_path):
    import subprocess
    import sys

    from tests.arch.tiny import save_tiny_checkpoint, save_tiny_llava_with_processor, write_images

    src = tmp_path / "src"
    images = tmp_path / "images"
    write_images(images, 2)
    if case in ("text_only_model", "generate_image_text_model"):
        save_tiny_checkpoint("LlamaForCausalLM", src, TEXT)
        expect = "reads text only"
    elif case == "bad_image":
        save_tiny_llava_with_processor(src, TEXT)
        (images / "img1.png").write_bytes(b"not a png")
        expect = "cannot decode image"
    else:
        save_tiny_checkpoint("LlavaForConditionalGeneration", src, TEXT)
        expect = "has no usable processor"
    out = tmp_path / "out"
    if case == "generate_image_text_model":
        args = ["generate", str(src), "--image", str(images / "img0.png"), "--prompt", "hi"]
    else:
        args = ["quantize", str(src), "--method", "gptq", "--images", str(images), "--nsamples", "2", "--seqlen", "64", "--group_size", "32", "--output_dir", str(out)]
    proc = subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and expect in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "out.lowbit-partial").exists()


def test_checkpoint_layouts_are_renamed_by_transformers_rules(tmp_path):
    """transformers saves LLaVA in the hub's layout (language_model.model.layers.*, vision_tower.*) and builds
    model.language_model.layers.*: lowbit maps either layout through transformers' own renaming rules before
    block 0, and both quantize to the same tensors, written under the names transformers builds."""
    from safetensors.torch import load_file, save_file

    hub = tmp_path / "hub"
    save_tiny_checkpoint("LlavaForConditionalGeneration", hub, TEXT)
    current = tmp_path / "current"
    shutil.copytree(hub, current)
    new = {"language_model.model.": "model.language_model.", "vision_tower.": "model.vision_tower.",
           "multi_modal_projector.": "model.multi_modal_projector.", "language_model.lm_head.": "lm_head."}
    tensors = load_file(hub / "model.safetensors")
    assert any(k.startswith("language_model.model.layers.") for k in tensors)  # the hub layout, as saved
    renamed = {}
    for name, t in tensors.items():
        prefix = next(p for p in new if name.startswith(p))
        renamed[new[prefix] + name[len(prefix):]] = t
    save_file(renamed, current / "model.safetensors", metadata={"format": "pt"})
    outs = {}
    for name, folder in (("hub", hub), ("current", current)):
        outs[name] = tmp_path / f"out-{name}"
        lowbit.quantize(str(folder), "rtn", Scheme(4, 32, sym=True), run=RunConfig(output_dir=str(outs[name]), device="cpu"), progress=False)
    a, b = load_file(outs["hub"] / "model.safetensors"), load_file(outs["current"] / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "model.language_model.layers.0.self_attn.q_proj.qweight" in a
