"""Mixture-of-experts models end to end on tiny from_config checkpoints (CPU, offline).

transformers fuses experts into 3-D parameters; lowbit quantizes every expert's projections as their own
linears and writes them under the per-expert names (`mlp.experts.{i}.gate_proj`, Mixtral's `w1`) that
transformers' integrations read. Each family's export is loaded by lowbit.load and by transformers' own
compressed-tensors integration (which dequantizes the per-expert tensors and fuses them again), and the
two must agree; gpt-oss (fused in its checkpoint, transposed, gate/up interleaved, biases), which no
transformers integration maps from per-expert names, is checked against its export decoded independently
(tests/reference.py) and put back into transformers' own fused model.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import lowbit
from lowbit.arch import spec_for
from lowbit.arch.experts import experts_modules
from lowbit.calib.experts import ExpertPlan, count_routed, plan_experts, tokens_to_every_expert
from lowbit.config import AutoRoundConfig, AwqConfig, CalibConfig, GptqConfig, RunConfig, Scheme
from lowbit.errors import LowbitError
from lowbit.model import Checkpoint, build_skeleton
from lowbit.model.names import check_complete, map_names
from lowbit.model.skeleton import load_tensors
from tests.arch.tiny import TINY_TEXT as TEXT
from tests.arch.tiny import logits, save_tiny_checkpoint, tiny_text_file
from tests.reference import dequantized_state_dict

# families whose checkpoints keep per-expert tensors: transformers' integration fuses our per-expert export again
GATED = ["Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM", "DeepseekV3ForCausalLM"]
# families shipped fused (transformers has no per-expert names for them): (transposed [E, in, out], gate/up interleaved)
FUSED = {"GptOssForCausalLM": (True, True), "Gemma4ForConditionalGeneration/moe": (False, False)}
SCHEME = Scheme(4, 32, sym=True)  # transformers' compressed-tensors integration reads symmetric experts only (it drops experts' zero points)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return tiny_text_file(tmp_path_factory)


def calib(text_file, **kw):
    return CalibConfig(dataset=str(text_file), nsamples=4, seqlen=32, batch_size=2, **kw)


def ids():
    return torch.randint(4, 100, (2, 16), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "GptOssForCausalLM", "Gemma4ForConditionalGeneration/moe"])
def test_unfused_skeleton_loaded_from_the_checkpoint_is_the_model(arch, tmp_path):
    """Per-expert checkpoints (what save_pretrained writes for Qwen3-MoE) and fused ones (gpt-oss) load into
    the unfused skeleton through the name map, and it computes what transformers' own fused model does."""
    fp_model = save_tiny_checkpoint(arch, tmp_path, TEXT)
    ckpt = Checkpoint(tmp_path)
    fused_in_checkpoint = any(k.endswith("experts.gate_up_proj") for k in ckpt.index)
    assert fused_in_checkpoint == (arch != "Qwen3MoeForCausalLM")  # gpt-oss and Gemma 4 ship fused experts
    skeleton = build_skeleton(ckpt.config)
    names = map_names(skeleton, ckpt.index)
    check_complete(skeleton, names, tmp_path)
    assert not names.unmapped
    load_tensors(skeleton, list(skeleton.state_dict(keep_vars=True).items()), ckpt, names, "cpu", torch.float32)
    assert experts_modules(skeleton) and not any(p.dim() == 3 for m in experts_modules(skeleton).values() for p in m.parameters())
    torch.testing.assert_close(logits(skeleton, ids()), logits(fp_model, ids()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", GATED)
def test_moe_family_every_expert_quantized_and_transformers_agrees(arch, tmp_path, text_file):
    from transformers import AutoModelForCausalLM

    src, out = tmp_path / "src", tmp_path / "out"
    fp_model = save_tiny_checkpoint(arch, src, TEXT)
    method = {"Qwen3MoeForCausalLM": GptqConfig(), "MixtralForCausalLM": AwqConfig()}.get(arch, "rtn")
    summary = lowbit.quantize(str(src), method, SCHEME, calib(text_file), RunConfig(output_dir=str(out), formats=("auto_round", "compressed-tensors"), device="cpu"), progress=False)

    spec = spec_for(fp_model.config)
    experts = {n: m for n, m in fp_model.named_modules() if hasattr(m, "has_gate")}
    expert_linears = [n for n in summary.quantized if ".experts." in n]
    n_experts = sum(next(p for p in m.parameters() if p.dim() == 3).shape[0] for m in experts.values())
    assert len(expert_linears) == 3 * n_experts  # gate, up, down of every expert of every MoE block
    with safe_open(next((out / "compressed-tensors").glob("*.safetensors")), framework="pt") as f:
        written = set(f.keys())
    some = expert_linears[-1]
    assert f"{some}.weight_packed" in written and some.startswith(spec.blocks)
    if arch == "Qwen2MoeForCausalLM":
        ignore = json.loads((out / "compressed-tensors" / "config.json").read_text())["quantization_config"]["ignore"]
        assert "model.layers.0.mlp.shared_expert_gate" in ignore and "model.layers.0.mlp.shared_expert.gate_proj" in summary.quantized

    theirs = logits(AutoModelForCausalLM.from_pretrained(out / "compressed-tensors", dtype=torch.float32).eval(), ids())
    ours = logits(lowbit.load(out / "auto_round"), ids())
    fp = logits(fp_model, ids())
    scale = fp.abs().max()
    assert (ours - theirs).abs().max() / scale < 2e-3  # one quantized model, two independent loaders
    assert (ours - fp).abs().max() > 1e-4 * scale  # and it is quantized


@pytest.mark.parametrize("arch", sorted(FUSED))
def test_fused_checkpoint_families_exported_per_expert(arch, tmp_path, text_file):
    """gpt-oss ([E, H, 2I], gate/up interleaved, biases) and Gemma 4 26B-A4B (MoE beside the dense MLP, inside
    the VLM) ship fused experts. Their GPTQ export, decoded from the format's definition (tests/reference.py)
    and stacked back into transformers' own fused experts, computes what lowbit.load computes (GPTQ for
    gpt-oss, RTN for Gemma 4, whose calibrated path the dense Gemma 4 tests cover)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    transposed, interleaved = FUSED[arch]
    src, out = tmp_path / "src", tmp_path / "out"
    fp_model = save_tiny_checkpoint(arch, src, TEXT)
    method = GptqConfig() if arch == "GptOssForCausalLM" else "rtn"  # calibrated through biased, interleaved experts
    summary = lowbit.quantize(str(src), method, SCHEME, calib(text_file), RunConfig(output_dir=str(out), formats=("auto_round",), device="cpu"), progress=False)
    state = dequantized_state_dict(out, "auto_round", 4, 32, True)
    auto = AutoModelForImageTextToText if "Conditional" in arch else AutoModelForCausalLM
    decoded = auto.from_pretrained(src, dtype=torch.float32).eval()
    fused = {}
    for prefix, module in [(n, m) for n, m in decoded.named_modules() if hasattr(m, "has_gate")]:
        e = module.gate_up_proj.shape[0]

        def stacked(linear, what="weight"):  # [E, out, in] (or [E, out] biases) from the per-expert tensors
            return torch.stack([state.pop(f"{prefix}.{j}.{linear}.{what}") for j in range(e)])

        gate, up, down = stacked("gate_proj"), stacked("up_proj"), stacked("down_proj")
        gate_up = torch.stack([gate, up], dim=2).flatten(1, 2) if interleaved else torch.cat([gate, up], dim=1)  # [E, 2I, H]
        fused[f"{prefix}.gate_up_proj"] = gate_up.transpose(1, 2) if transposed else gate_up
        fused[f"{prefix}.down_proj"] = down.transpose(1, 2) if transposed else down
        if module.has_bias:
            bg, bu = stacked("gate_proj", "bias"), stacked("up_proj", "bias")
            fused[f"{prefix}.gate_up_proj_bias"] = torch.stack([bg, bu], dim=2).flatten(1, 2) if interleaved else torch.cat([bg, bu], dim=1)
            fused[f"{prefix}.down_proj_bias"] = stacked("down_proj", "bias")
    assert fused and len([n for n in summary.quantized if ".experts." in n]) == 3 * sum(t.shape[0] for k, t in fused.items() if k.endswith("down_proj"))
    missing, unexpected = decoded.load_state_dict({**state, **fused}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ours, want, fp = logits(lowbit.load(out), ids()), logits(decoded, ids()), logits(fp_model, ids())
    assert (ours - want).abs().max() / want.abs().max() < 1e-4
    assert (ours - fp).abs().max() > 1e-4 * fp.abs().max()


def test_every_token_through_every_expert_changes_statistics_not_outputs(tmp_path, text_file):
    """With all-expert calibration each expert's linears see every token, yet the block's output is the
    routed one; without it each expert sees exactly the tokens the router sends it (counted independently)."""
    from lowbit.calib.capture import capture_block_inputs
    from lowbit.engine import BlockEngine

    fp_model = save_tiny_checkpoint("Qwen3MoeForCausalLM", tmp_path, TEXT)
    ckpt = Checkpoint(tmp_path)
    model = build_skeleton(ckpt.config)
    names = map_names(model, ckpt.index)
    load_tensors(model, list(model.state_dict(keep_vars=True).items()), ckpt, names, "cpu", torch.float32)
    windows = torch.randint(4, 100, (3, 20), generator=torch.Generator().manual_seed(0))
    plan = capture_block_inputs(model, model.model.layers, [{"input_ids": w[None]} for w in windows], "cpu", "cpu", ())
    engine = BlockEngine(plan, "cpu", "cpu", 2)
    stream, block = engine.stream(), model.model.layers[0]
    experts = block.mlp.experts
    rows = {}
    hooks = [getattr(experts, str(e)).gate_proj.register_forward_pre_hook(lambda m, a, e=e: rows.__setitem__(e, rows.get(e, 0) + a[0].shape[0]))
             for e in range(8)]
    routed, tokens = count_routed(engine, block, 0, stream)
    routed = routed["mlp.experts"]
    assert tokens == {"mlp.experts": 3 * 20}
    # independent count: the router's own top-k over the block's post-attention inputs
    top = []
    handle = block.mlp.gate.register_forward_hook(lambda m, a, out: top.append(out[2] if isinstance(out, tuple) else out))
    with torch.no_grad():
        want_out = torch.cat([engine.call(block, 0, stream, idx) for idx in engine.batches(3)])
    handle.remove()
    assert routed == torch.bincount(torch.cat([t.flatten() for t in top]), minlength=8).tolist()
    assert {e: rows.get(e, 0) for e in range(8)} == {e: c for e, c in enumerate(routed)}  # the call above: count_routed routes, runs no expert
    rows.clear()
    weights = {e: [] for e in range(8)}  # the row weights each expert's linears see, per call
    seen = [getattr(experts, str(e)).down_proj.register_forward_pre_hook(lambda m, a, e=e: weights[e].append(getattr(experts, str(e)).row_weight.clone()))
            for e in range(8)]
    with torch.no_grad(), tokens_to_every_expert(block, ExpertPlan(all_tokens=True, tokens={"mlp.experts": 60}, unrouted_tokens=6.0)):
        got_out = torch.cat([engine.call(block, 0, stream, idx) for idx in engine.batches(3)])
    assert rows == {e: 3 * 20 for e in range(8)}
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
    # routed rows (the router's own top-k of the same calls) weigh 1 + 6/60, the others 6/60 (together 6 tokens' worth)
    for e in range(8):
        want = [0.1 + (t == e).any(-1).float() for t in top]
        assert len(weights[e]) == len(want) and all(torch.allclose(g, w) for g, w in zip(weights[e], want))
    assert all(getattr(experts, str(e)).row_weight is None for e in range(8))
    for h in seen:
        h.remove()
    seen_now = []
    probe = [getattr(experts, str(e)).down_proj.register_forward_pre_hook(lambda m, a, e=e: seen_now.append(getattr(experts, str(e)).row_weight))
             for e in range(8)]
    with torch.no_grad(), tokens_to_every_expert(block, ExpertPlan(all_tokens=True, tokens={"mlp.experts": 60})):  # default: all alike
        engine.call(block, 0, stream, [0])
    assert rows == {e: 4 * 20 for e in range(8)} and seen_now == [None] * 8  # every token through all 8, no row weights
    for h in probe:
        h.remove()
    for h in hooks:
        h.remove()
    assert not experts.lowbit_all_tokens  # the switch lives on the module, for one block, and is reset

    # the plan: GPTQ with all-expert calibration feeds everyone; AutoRound cannot, and starving experts go to RTN
    assert plan_experts(engine, block, 0, stream, "model.layers.0", CalibConfig(), GptqConfig()).all_tokens
    ar = plan_experts(engine, block, 0, stream, "model.layers.0", CalibConfig(moe_min_tokens=10**6), AutoRoundConfig())
    assert not ar.all_tokens and ar.fallback == {f"mlp.experts.{e}": c for e, c in enumerate(routed)}
    # routed rows only (weight 0 on the rest): GPTQ's starving experts fall back to RTN as without all-expert calibration
    only = plan_experts(engine, block, 0, stream, "model.layers.0", CalibConfig(moe_min_tokens=10**6, moe_unrouted_tokens=0.0), GptqConfig())
    assert only.all_tokens and only.fallback == ar.fallback


def test_starved_experts_fall_back_to_rtn_and_are_listed(tmp_path, text_file):
    """AutoRound (which cannot reach an expert without routed tokens) with a token threshold above every
    count: every expert is written exactly as RTN writes it, and the summary lists each with its count."""
    src = tmp_path / "src"
    save_tiny_checkpoint("Qwen3MoeForCausalLM", src, TEXT)
    ar = lowbit.quantize(str(src), AutoRoundConfig(iters=20), SCHEME, calib(text_file, moe_min_tokens=10**6),
                         RunConfig(output_dir=str(tmp_path / "ar"), formats=("auto_round",), device="cpu"), progress=False)
    lowbit.quantize(str(src), "rtn", SCHEME, run=RunConfig(output_dir=str(tmp_path / "rtn"), formats=("auto_round",), device="cpu"), progress=False)
    assert len(ar.experts_rtn) == 2 * 8 and all(n.startswith("model.layers.") for n in ar.experts_rtn)
    assert sorted(ar.experts_rtn.values()) == sorted(c for per in ar.routed.values() for c in per)
    log = json.loads((tmp_path / "ar" / "lowbit_log.json").read_text())
    assert log["experts_rtn_fallback"] == ar.experts_rtn
    a, r = dequantized_state_dict(tmp_path / "ar", "auto_round", 4, 32, True), dequantized_state_dict(tmp_path / "rtn", "auto_round", 4, 32, True)
    expert_weights = [k for k in a if ".experts." in k and k.endswith(".weight")]
    assert len(expert_weights) == 48
    for k in expert_weights:
        torch.testing.assert_close(a[k], r[k], rtol=0, atol=0)
    assert any(not torch.equal(a[k], r[k]) for k in a if ".self_attn." in k and k.endswith("proj.weight"))  # the rest was AutoRound's


def test_autoround_trains_the_experts_above_the_threshold_beside_rtn_ones(tmp_path, text_file):
    """A threshold between the routed counts: the experts under it are quantized with RTN (plain linears in the
    block while it trains) beside trained ones in the same grouped GEMM, which then stacks their weights instead
    of reading AutoRound's W_hat buffer whole. The RTN'd experts are written exactly as RTN writes them, the
    others trained."""
    src = tmp_path / "src"
    save_tiny_checkpoint("Qwen3MoeForCausalLM", src, TEXT)
    run = lambda name, method, calibration=CalibConfig(): lowbit.quantize(  # noqa: E731
        str(src), method, SCHEME, calibration, RunConfig(output_dir=str(tmp_path / name), formats=("auto_round",), device="cpu"), progress=False)
    first = run("count", AutoRoundConfig(iters=1), calib(text_file, moe_min_tokens=10**6)).routed["model.layers.0.mlp.experts"]
    threshold = first[0]  # block 0 (its inputs do not depend on the method): expert 0 trained, a later one under it
    assert min(first[1:]) < threshold
    ar = run("ar", AutoRoundConfig(iters=10), calib(text_file, moe_min_tokens=threshold))
    run("rtn", "rtn")
    starved = {f"{m}.{e}": c for m, per in ar.routed.items() for e, c in enumerate(per) if c < threshold}
    assert ar.experts_rtn == starved and 0 < len(starved) < 16
    a, r = dequantized_state_dict(tmp_path / "ar", "auto_round", 4, 32, True), dequantized_state_dict(tmp_path / "rtn", "auto_round", 4, 32, True)
    for k in a:
        if ".experts." in k and k.endswith(".weight"):
            expert = k.rsplit(".", 2)[0]
            assert torch.equal(a[k], r[k]) == (expert in starved), k


def test_expert_without_routed_tokens_stops_the_run_when_all_expert_calibration_is_off(tmp_path, text_file, capsys):
    """Router rows set so expert 0 is never in the top 2: its logit is 0, experts 1-4 have +v.x and 5-7 -v.x,
    so at least three others score above it for any x. With all-expert calibration off that is refused in
    one line; with it on (the default) GPTQ calibrates expert 0 on every token."""
    from safetensors.torch import load_file, save_file

    from lowbit.cli import main

    src = tmp_path / "src"
    save_tiny_checkpoint("Qwen3MoeForCausalLM", src, TEXT)
    shard = next(src.glob("*.safetensors"))
    tensors = load_file(shard)
    for name in [k for k in tensors if k.endswith("mlp.gate.weight")]:
        w = tensors[name]  # [E, H]
        v = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(1))
        w[0], w[1:5], w[5:] = 0.0, v, -v
    capsys.readouterr()
    save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "out"
    args = ["quantize", str(src), "--method", "gptq", "--sym", "--group_size", "32", "--dataset", str(text_file), "--nsamples", "4", "--seqlen", "32",
            "--device", "cpu", "--format", "auto_round", "--output_dir", str(out)]
    assert main(args + ["--no_moe_all_experts"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "lowbit gptq" not in line]  # the progress bar aside
    assert len(err) == 1 and "mlp.experts.0 was routed no calibration token" in err[0] and "--no_moe_all_experts" in err[0]
    assert not out.exists()
    summary = lowbit.quantize(str(src), "gptq", SCHEME, calib(text_file), RunConfig(output_dir=str(out), formats=("auto_round",), device="cpu"), progress=False)
    assert summary.experts_all_tokens and not summary.experts_rtn
    assert all(per[0] == 0 for per in summary.routed.values())  # reported as never routed


def test_a_format_that_cannot_hold_the_experts_is_refused_before_any_work(tmp_path, text_file, capsys):
    """AutoAWQ packs 8 output columns per int32: experts 36 wide cannot be written and may not silently stay in fp."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.cli import main

    src = tmp_path / "src"
    save_tiny_checkpoint("Qwen3MoeForCausalLM", src, TEXT)
    cfg = AutoConfig.from_pretrained(src)
    cfg.moe_intermediate_size = 36
    AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["quantize", str(src), "--method", "rtn", "--format", "auto_awq", "--asym", "--group_size", "4", "--device", "cpu", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "auto_awq cannot hold the experts' 36x64 projections" in err[0]
    assert not out.exists() and not list(tmp_path.glob("out*"))
