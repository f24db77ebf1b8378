"""Scale check for diffusion pipelines: a random-weight FLUX.1-dev-shaped transformer (hidden 3072, 24 heads of
128, joint attention dim 4096, pooled 768, guidance embedding, 64 latent channels) in a FluxPipeline with small
random text encoders of the widths the transformer reads and a 4-level VAE (latents at 1/8 of the image size),
quantized with the lowbit CLI: RTN, then AutoRound with few iterations calibrated through the pipeline's own
denoising loop (8 prompts x 4 steps at 512 x 512, 512 T5 tokens: 32 samples of 1024 image + 512 text tokens).
Peak RSS / VRAM and the time per block come from each run's lowbit_log.json; each output is then loaded with
lowbit.load_pipeline (QuantLinear: Triton kernels on CUDA) and its latents compared with the fp pipeline's on
two prompts the calibration did not see, and per block the relative error of each output stream against the fp
block at the first denoising step of those prompts (`block_errors`: the block on the fp block's inputs, and on
the quantized pipeline's own inputs). `--lrs 0.05` adds AutoRound rows at other step sizes (0.05: 1/iters at 20
iterations, the default before it was capped at 5e-3).

The transformer is written tensor by tensor from its meta skeleton (random bf16: weights N(0, 0.02^2), norm
weights near 1), never whole in RAM. FLUX.1-dev has 19 double-stream and 38 single-stream blocks (12B); a
single H200's 64 GB disk and a 300 s budget take `--double 4 --single 8` of the real shapes (2.5B parameters,
5 GB): peak RAM and VRAM depend on the block, not on the depth.

    python bench/diffusion_scale.py --double 4 --single 8 --workdir /tmp/flux     # GPU
    python bench/diffusion_scale.py --tiny --device cpu                            # smoke test of this script

`--device_map 0,1` (two GPUs, one call under 9 minutes): the WHOLE FLUX.1-dev-shaped pipeline, transformer at
full depth (19 + 38 blocks, 22.2 GiB bf16) with a T5-XXL-shaped encoder (9.1 GiB), CLIP-L and FLUX's VAE
(written once, ~33 GB), quantized with `--device_map 0,1`: RTN, AutoRound under a `--max_memory` budget
(`--budget`, default 10GiB,22GiB: T5-XXL goes to the second GPU, blocks fill both, the rest is streamed) and
AutoRound under free memory; per row the placement (each component and block), the bytes planned per GPU
against the peak each reached during the capture and over the run, peak RSS, time per block, and
load_pipeline(device_map="auto", max_memory=--load_budget) generating across both GPUs against the fp
pipeline. `--time-limit` (default 480 s) stops it cleanly, keeping what was measured (JSON + log in --out).

    python bench/diffusion_scale.py --device_map 0,1 --workdir /tmp/flux --out $OUT                # 2 GPUs
    python bench/diffusion_scale.py --tiny --device_map cpu,cpu --budget 1GiB,1GiB --out /tmp/o   # CPU smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
TINY = dict(FLUX_DEV, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(8, 12, 12))
HELD_OUT = ["a boat on the lake under snow mountain at sunset", "portrait of an old man with a hat in the rain"]


def write_prompts(path: Path, n: int) -> Path:
    """Calibration prompts in the tiny text encoders' vocabulary (lowbit's default prompts would be mostly
    unknown words to them, every prompt then nearly the same text), none of them a held-out prompt."""
    import random

    from tests.diffusion_tiny import WORDS

    rng = random.Random(0)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(n)) + "\n")
    return path


def write_random_transformer(config: dict, path: Path, shard_bytes: int = 2 << 30) -> int:
    """Every tensor of the transformer's state dict, random bf16, in diffusers' sharded layout; returns bytes."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from common import write_random_shards

    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    model.save_config(path)
    return write_random_shards(model.state_dict(keep_vars=True).items(), path, "diffusion_pytorch_model", shard_bytes)


def write_pipeline(path: Path, config: dict, double: int, single: int) -> int:
    from tests.diffusion_tiny import tiny_flux_pipeline

    shutil.rmtree(path, ignore_errors=True)
    small = dict(config, num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2, axes_dims_rope=(8, 12, 12))
    pipe = tiny_flux_pipeline(dtype=torch.bfloat16, transformer_config=small, vae={"levels": 4})
    pipe.save_pretrained(path)
    return write_random_transformer(dict(config, num_layers=double, num_single_layers=single), path / "transformer")


# FLUX.1-dev's other components, by their published configs: CLIP-L (text_encoder), T5-XXL's encoder
# (text_encoder_2), the 16-channel VAE; TINY_COMPONENTS: the same classes at toy widths for --tiny
FULL_COMPONENTS = dict(
    clip=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
              projection_dim=768, hidden_act="quick_gelu", bos_token_id=2, eos_token_id=1, pad_token_id=0),
    t5=dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu", pad_token_id=0,
            eos_token_id=1, decoder_start_token_id=0),
    vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159),
)
TINY_COMPONENTS = dict(clip=dict(FULL_COMPONENTS["clip"], vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                 projection_dim=64),
                       t5=dict(FULL_COMPONENTS["t5"], vocab_size=64, d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2),
                       vae=dict(FULL_COMPONENTS["vae"], block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4))


def write_random_components(path: Path, sizes: dict) -> int:
    """text_encoder, text_encoder_2 and vae of the pipeline at `path` replaced by random bf16 ones of these
    configs (built on meta, written tensor by tensor); the tokenizers padded to CLIP's 77 and T5's 512 tokens."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from common import write_random_shards
    from tests.diffusion_tiny import word_tokenizer

    vae = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16,
               use_quant_conv=False, use_post_quant_conv=False, sample_size=1024, **sizes["vae"])
    total = 0
    for name, build, stem in (("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**sizes["clip"])), "model"),
                              ("text_encoder_2", lambda: T5EncoderModel(T5Config(**sizes["t5"])), "model"),
                              ("vae", lambda: AutoencoderKL(**vae), "diffusion_pytorch_model")):
        shutil.rmtree(path / name, ignore_errors=True)
        (path / name).mkdir()
        with init_empty_weights():
            model = build()
        (model.config.save_pretrained if stem == "model" else model.save_config)(path / name)
        total += write_random_shards(model.state_dict(keep_vars=True).items(), path / name, stem, 2 << 30)
    word_tokenizer(77).save_pretrained(path / "tokenizer")
    word_tokenizer(512).save_pretrained(path / "tokenizer_2")
    return total


def quantize(pipe: Path, out: Path, extra: list[str], device: str | None, timeout: float | None = None) -> dict:
    """One `lowbit quantize` run in a subprocess (`device` None: `extra` names the devices); its summary."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "lowbit.cli", "quantize", str(pipe), "--scheme", "W4A16", "--group_size", "128", "--sym", "--format", "auto_round",
           "--output_dir", str(out), *(["--device", device] if device else []), *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        tail = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        print(tail[-2500:], flush=True)
        return {"error": f"stopped at the time limit after {time.time() - t0:.0f} s", "wall_s": round(time.time() - t0, 1)}
    wall = time.time() - t0
    print(proc.stderr[-2500:], proc.stdout[-2500:], sep="\n", flush=True)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1], "wall_s": round(wall, 1)}
    log = json.loads((out / "lowbit_log.json").read_text())
    return {"wall_s": round(wall, 1), "seconds": log["seconds"], "calibration_s": log["calibration_seconds"], "block_s": log["block_seconds"],
            "peak_rss_gib": round(log["peak_rss_bytes"] / 2**30, 2), "peak_vram_gib": {d: round(b / 2**30, 2) for d, b in log["peak_vram_bytes"].items()},
            "quantized": len(log["quantized"]), "kept_fp": sorted(set(log["kept_fp"]) & {"text_encoder", "text_encoder_2", "vae", "x_embedder", "proj_out"}),
            "losses": log["block_losses"][:3], "placement": log.get("placement", {})}


@torch.no_grad()
def latents_of(pipe, device: str, gen_kwargs: dict) -> tuple[torch.Tensor, float]:
    pipe.set_progress_bar_config(disable=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.time()
    out = pipe(HELD_OUT, generator=torch.Generator("cpu").manual_seed(3), output_type="latent", **gen_kwargs).images
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out.float().cpu(), time.time() - t0


@torch.no_grad()
def transformer_output(transformer, config: dict, size: int, text_tokens: int, device: str, dtype) -> torch.Tensor:
    """The transformer's output on one fixed random input at the real token counts (1/16 of the image side
    per axis: 8x VAE, 2x2 packing), fp32 on the CPU. Random N(0, 1) text states are far from what the text
    encoders give (the calibration's distribution): a check of the kernels at scale more than of the method;
    the latents of held-out prompts through the pipeline are the method's measure."""
    gen = torch.Generator().manual_seed(11)
    side = size // 16
    ids = torch.zeros(side * side, 3)
    ids[:, 1], ids[:, 2] = torch.arange(side * side) // side, torch.arange(side * side) % side
    inputs = dict(hidden_states=torch.randn(1, side * side, config["in_channels"], generator=gen),
                  encoder_hidden_states=torch.randn(1, text_tokens, config["joint_attention_dim"], generator=gen),
                  pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=gen), timestep=torch.tensor([0.6]),
                  guidance=torch.tensor([3.5]), img_ids=ids, txt_ids=torch.zeros(text_tokens, 3))
    inputs = {k: v.to(device, dtype) for k, v in inputs.items()}
    return transformer(**inputs).sample.float().cpu()


def transformer_blocks(pipe) -> list:
    t = pipe.transformer
    return [*t.transformer_blocks, *t.single_transformer_blocks]


@torch.no_grad()
def record_blocks(pipe, device: str, gen_kwargs: dict) -> list:
    """Per block in forward order, (args, kwargs, outputs) of its first call while the pipeline generates the
    held-out prompts: the first denoising step, where the fp and quantized pipelines start from the same latents."""
    seen, hooks = {}, []
    for i, block in enumerate(transformer_blocks(pipe)):
        def hook(module, args, kwargs, out, i=i):
            seen.setdefault(i, (args, kwargs, out))
        hooks.append(block.register_forward_hook(hook, with_kwargs=True))
    try:
        latents_of(pipe, device, gen_kwargs)
    finally:
        for h in hooks:
            h.remove()
    return [seen[i] for i in range(len(seen))]


def rel(a, b) -> float:
    a, b = a.float().cpu(), b.float().cpu()  # the quantized pipeline's blocks may sit on another GPU
    return round(((a - b).norm() / b.norm()).item(), 5)


@torch.no_grad()
def block_errors(q_pipe, fp_record: list, device: str, gen_kwargs: dict) -> list[dict]:
    """Per block, the relative error of each output stream (img: image tokens, txt: text tokens) against the fp
    pipeline's block at the first denoising step of the held-out prompts: `local`, the quantized block on the fp
    block's own inputs (what the block's quantization alone costs); `chained`, the quantized pipeline's block on
    its own inputs (the error carried from the blocks before). FLUX blocks return (text, image)."""
    q_record = record_blocks(q_pipe, device, gen_kwargs)
    out = []
    for block, (args, kwargs, fp_out), (_, _, q_out) in zip(transformer_blocks(q_pipe), fp_record, q_record):
        local = block(*args, **kwargs)
        row = {}
        for name, k in (("txt", 0), ("img", 1)):
            row[f"local_{name}"] = rel(local[k], fp_out[k])
            row[f"chained_{name}"] = rel(q_out[k], fp_out[k])
        out.append(row)
    return out


class Tee:
    """stdout also written to a log file (the subprocesses' tails are printed through it)."""

    def __init__(self, path: Path):
        self.stream, self.file = sys.stdout, open(path, "a")

    def write(self, text):
        self.stream.write(text)
        self.file.write(text)
        self.file.flush()

    def flush(self):
        self.stream.flush()


def gib(n) -> float:
    return round(n / 2**30, 2)


def peaks() -> dict:
    return {f"cuda:{i}": gib(torch.cuda.max_memory_allocated(i)) for i in range(torch.cuda.device_count())}


def placement_record(plan) -> dict:
    """Where load_pipeline put each component and block, and the bytes it planned per device."""
    if plan is None:
        return {}
    return {"devices": {**plan.components, **plan.blocks}, "planned_gib": {d: gib(b) for d, b in plan.used.items()}}


def where_summary(devices: dict) -> str:
    """'text_encoder_2 cuda:1, ...; blocks: cuda:0 x11, cuda:1 x37, stream x9'."""
    from collections import Counter

    comps = ", ".join(f"{n} {d}" for n, d in devices.items() if "blocks." not in n)
    blocks = Counter(d for n, d in devices.items() if "blocks." in n)
    return f"{comps}; blocks: " + ", ".join(f"{d} x{k}" for d, k in blocks.items())


def main_multi(args) -> None:
    """The whole FLUX.1-dev-shaped pipeline (transformer at full depth, T5-XXL / CLIP-L / VAE at full size)
    quantized with --device_map over several GPUs, under free memory and under a --max_memory budget that
    spreads blocks over both GPUs and puts a component on the second; each output loaded with
    load_pipeline(device_map="auto") and compared with the fp pipeline. Stops cleanly at --time-limit."""
    import diffusers
    import transformers
    from diffusers import FluxTransformer2DModel

    from lowbit.diffusion import load_pipeline
    from lowbit.diffusion.components import assemble, load_components, other_components
    from lowbit.diffusion.folder import open_pipeline

    start = time.time()
    left = lambda: args.time_limit - (time.time() - start)  # noqa: E731
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    name = f"diffusion-scale-multi-{'tiny-' if args.tiny else ''}{stamp}"
    sys.stdout = Tee(out_dir / f"{name}.log")
    on_gpu = torch.cuda.is_available() and not args.tiny
    dtype = torch.bfloat16 if on_gpu else torch.float32
    gpu = "cuda:0" if on_gpu else "cpu"
    config = TINY if args.tiny else FLUX_DEV
    double, single = (1, 2) if args.tiny else (config["num_layers"], config["num_single_layers"])
    env = {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else ["cpu"],
           "torch": torch.__version__, "transformers": transformers.__version__, "diffusers": diffusers.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    result = {"env": env, "args": vars(args), "blocks": f"{double} double + {single} single", "rows": {}}

    def save():
        result["elapsed_s"] = round(time.time() - start, 1)
        (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))

    work = Path(args.workdir)
    pipe_dir = work / "flux"
    t0 = time.time()
    nbytes = write_pipeline(pipe_dir, config, double, single)
    cbytes = write_random_components(pipe_dir, TINY_COMPONENTS if args.tiny else FULL_COMPONENTS)
    result.update(transformer_gib=gib(nbytes), components_gib=gib(cbytes), write_s=round(time.time() - t0, 1))
    print(f"wrote the pipeline: transformer {gib(nbytes)} GiB + components {gib(cbytes)} GiB in {time.time() - t0:.0f} s", flush=True)
    save()
    prompts = write_prompts(work / "prompts.txt", args.nprompts)
    calib = ["--prompt_file", str(prompts), "--nprompts", str(args.nprompts), "--num_inference_steps", str(args.steps), "--height", str(args.size),
             "--width", str(args.size), "--max_sequence_length", str(args.text_tokens), "--batch_size", "4"]
    gen = dict(num_inference_steps=args.steps, height=args.size, width=args.size, max_sequence_length=args.text_tokens)

    # the fp reference: every component and the transformer loaded straight onto one GPU
    t0 = time.time()
    folder = open_pipeline(pipe_dir)
    comps = load_components(folder, {n: gpu for n in other_components(folder)}, dtype)
    fp_t = FluxTransformer2DModel.from_pretrained(pipe_dir / "transformer", dtype=dtype, device_map={"": gpu}).eval()
    fp = assemble(folder, fp_t, comps, dtype)
    print(f"fp pipeline on {gpu} in {time.time() - t0:.0f} s", flush=True)
    latents_of(fp, gpu, gen)  # warm-up
    ref, fp_s = latents_of(fp, gpu, gen)
    ref_out = transformer_output(fp.transformer, config, args.size, args.text_tokens, gpu, dtype)
    fp_record = record_blocks(fp, gpu, gen)
    result["fp_generate_s"] = round(fp_s, 3)
    del fp, fp_t, comps
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()

    devices = ["--device_map", args.device_map]
    ar = ["--method", "autoround", "--iters", str(args.iters), "--disable_torch_compile", *calib]
    runs = [("rtn", ["--method", "rtn", *devices], None),
            ("autoround_budget", [*ar, *devices, "--max_memory", args.budget], args.budget),
            ("autoround", [*ar, *devices], None)]
    for row_name, extra, budget in runs:
        if left() < 30:
            result["rows"][row_name] = {"error": "not run: time limit"}
            print(f"{row_name}: not run, time limit", flush=True)
            continue
        row = result["rows"][row_name] = quantize(pipe_dir, work / row_name, extra, None, timeout=left())
        row["budget"] = budget
        save()
        if "error" in row:
            continue
        place = row.get("placement", {})
        print(f"{row_name}: capture placement: {where_summary(place.get('devices', {}))}; planned GiB {({d: gib(b) for d, b in place.get('planned_bytes', {}).items()})}"
              if place.get("devices") else f"{row_name}: no calibration", flush=True)
        if left() < 20:
            row["eval_error"] = "not evaluated: time limit"
            continue
        try:  # a failure here must not lose the quantization figures above
            if on_gpu:
                for i in range(torch.cuda.device_count()):
                    torch.cuda.reset_peak_memory_stats(i)
            load_budget = {i: size for i, size in enumerate(args.load_budget.split(","))} if on_gpu else None
            t0 = time.time()
            q = load_pipeline(work / row_name, device_map="auto", dtype=dtype, max_memory=load_budget)
            row["load_s"] = round(time.time() - t0, 1)
            row["load_placement"] = placement_record(q.lowbit_placement)
            latents_of(q, gpu, gen)
            lat, q_s = latents_of(q, gpu, gen)
            row["latent_rel_err"] = rel(lat, ref)
            row["transformer_out_rel_err"] = rel(transformer_output(q.transformer, config, args.size, args.text_tokens, gpu, dtype), ref_out)
            row["generate_s"] = round(q_s, 3)
            row["block_errors"] = block_errors(q, fp_record, gpu, gen)
            row["load_peak_vram_gib"] = peaks() if on_gpu else {}
            if row["load_placement"]:
                print(f"{row_name}: load_pipeline(auto, max_memory={load_budget}): {where_summary(row['load_placement']['devices'])}", flush=True)
            del q
        except Exception as exc:  # noqa: BLE001
            row["eval_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(row["eval_error"], flush=True)
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
        shutil.rmtree(work / row_name, ignore_errors=True)
        save()

    print(f"\n{', '.join(env['gpus'])}, torch {env['torch']}, diffusers {env['diffusers']}: FLUX.1-dev shapes, {result['blocks']} blocks, "
          f"transformer {result['transformer_gib']} GiB + components {result['components_gib']} GiB, written in {result['write_s']} s; "
          f"--device_map {args.device_map}; fp generate {result['fp_generate_s']} s")
    print(f"{'row':17} {'total s':>7} {'calib s':>7} {'s/dbl':>6} {'s/sgl':>6} {'RSS GiB':>7}  {'capture planned / peak GiB per GPU':36} {'run peak GiB':18} "
          f"{'latent err':>10} {'gen s':>6}  {'load planned / peak GiB':28}")
    fmt = lambda d: "/".join(f"{v:.1f}" for v in d.values()) if d else "-"  # noqa: E731
    for row_name, r in result["rows"].items():
        if "seconds" not in r:
            print(f"{row_name:17} {r.get('error')}")
            continue
        place = r.get("placement", {})
        planned = {d: gib(b) for d, b in place.get("planned_bytes", {}).items()}
        captured = {d: gib(b) for d, b in place.get("capture_peak_vram_bytes", {}).items()}
        load = r.get("load_placement", {})
        print(f"{row_name:17} {r['seconds']:7.1f} {r['calibration_s']:7.1f} {statistics.median(r['block_s'][:double]):6.2f} "
              f"{statistics.median(r['block_s'][double:]):6.2f} {r['peak_rss_gib']:7.2f}  {fmt(planned) + ' / ' + fmt(captured):36} "
              f"{fmt(r['peak_vram_gib']):18} {r.get('latent_rel_err', float('nan')):10.4f} {r.get('generate_s', float('nan')):6.2f}  "
              f"{fmt(load.get('planned_gib', {})) + ' / ' + fmt(r.get('load_peak_vram_gib', {})):28}")
    save()
    print(f"results: {out_dir / (name + '.json')}, log beside it; {time.time() - start:.0f} s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--double", type=int, default=4)
    p.add_argument("--single", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--lrs", default="", help="comma-separated AutoRound step sizes to add as rows beside the default's, e.g. 0.05 (1/iters at 20 iterations)")
    p.add_argument("--nprompts", type=int, default=None, help="calibration prompts (default 8; 4 with --device_map)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--text_tokens", type=int, default=512)
    p.add_argument("--workdir", default="/tmp/flux-scale")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy widths, 1 + 2 blocks, 64 px, 16 text tokens: a smoke test of this script on the CPU")
    p.add_argument("--device_map", default=None, help="e.g. 0,1: the whole FLUX.1-dev-shaped pipeline (full depth, full-size text encoders and VAE) "
                                                     "quantized over these GPUs (--double / --single ignored); cpu,cpu with --tiny")
    p.add_argument("--budget", default="10GiB,22GiB", help="--max_memory of the budget row (--device_map mode): T5-XXL does not fit beside the "
                                                          "first GPU's blocks, the blocks spread over both GPUs, the rest streamed")
    p.add_argument("--load_budget", default="6GiB,60GiB", help="load_pipeline's max_memory per GPU (--device_map mode): spreads the W4 pipeline over both")
    p.add_argument("--time-limit", dest="time_limit", type=float, default=480, help="--device_map mode: seconds after which no new run starts and a "
                                                                                    "running one is stopped; what was measured is kept")
    args = p.parse_args()
    if args.nprompts is None:
        args.nprompts = 4 if args.device_map else 8
    if args.tiny:
        args.double, args.single, args.size, args.text_tokens, args.nprompts, args.steps, args.iters = 1, 2, 64, 16, 2, 2, 2
    if args.device_map:
        return main_multi(args)
    import diffusers
    import transformers
    from diffusers import DiffusionPipeline

    from lowbit.diffusion import load_pipeline

    work = Path(args.workdir)
    pipe_dir = work / "flux"
    t0 = time.time()
    nbytes = write_pipeline(pipe_dir, TINY if args.tiny else FLUX_DEV, args.double, args.single)
    print(f"wrote the pipeline ({nbytes / 2**30:.2f} GiB transformer) in {time.time() - t0:.0f} s", flush=True)
    prompts = write_prompts(work / "prompts.txt", args.nprompts)
    calib = ["--prompt_file", str(prompts), "--nprompts", str(args.nprompts), "--num_inference_steps", str(args.steps), "--height", str(args.size), "--width", str(args.size),
             "--max_sequence_length", str(args.text_tokens), "--batch_size", "4"]
    rows = {"rtn": quantize(pipe_dir, work / "rtn", ["--method", "rtn"], args.device),
            "autoround": quantize(pipe_dir, work / "autoround", ["--method", "autoround", "--iters", str(args.iters), "--disable_torch_compile", *calib], args.device)}
    for lr in filter(None, args.lrs.split(",")):
        rows[f"autoround_lr{lr}"] = quantize(pipe_dir, work / f"autoround_lr{lr}", ["--method", "autoround", "--iters", str(args.iters), "--lr", lr,
                                                                                  "--disable_torch_compile", *calib], args.device)

    gen = dict(num_inference_steps=args.steps, height=args.size, width=args.size, max_sequence_length=args.text_tokens)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    fp = DiffusionPipeline.from_pretrained(pipe_dir, dtype=dtype).to(args.device)
    config = TINY if args.tiny else FLUX_DEV
    latents_of(fp, args.device, gen)  # warm-up
    ref, fp_s = latents_of(fp, args.device, gen)
    ref_out = transformer_output(fp.transformer, config, args.size, args.text_tokens, args.device, dtype)
    fp_record = record_blocks(fp, args.device, gen)
    del fp
    for name, row in rows.items():
        if "error" in row:
            continue
        try:  # a failure here must not lose the quantization figures above
            q = load_pipeline(work / name, device_map=None if args.device == "cpu" else args.device, dtype=dtype)
            latents_of(q, args.device, gen)
            lat, q_s = latents_of(q, args.device, gen)
            row["latent_rel_err"] = round(((lat - ref).norm() / ref.norm()).item(), 5)
            out = transformer_output(q.transformer, config, args.size, args.text_tokens, args.device, dtype)
            row["transformer_out_rel_err"] = round(((out - ref_out).norm() / ref_out.norm()).item(), 5)
            row["generate_s"], row["fp_generate_s"] = round(q_s, 3), round(fp_s, 3)
            row["block_errors"] = block_errors(q, fp_record, args.device, gen)
            del q
        except Exception as exc:  # noqa: BLE001
            row["eval_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(row["eval_error"], flush=True)
        shutil.rmtree(work / name, ignore_errors=True)

    env = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
           "diffusers": diffusers.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    result = {"env": env, "args": vars(args), "transformer_gib": round(nbytes / 2**30, 2), "blocks": f"{args.double} double + {args.single} single", "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = f"diffusion-scale-{'tiny-' if args.tiny else ''}{time.strftime('%Y-%m-%d')}.json"
    (Path(args.out) / name).write_text(json.dumps(result, indent=2))
    n = args.double + args.single
    print(f"\n{env['gpu']}, torch {env['torch']}, diffusers {env['diffusers']}: FLUX.1-dev shapes, {result['blocks']} blocks, {result['transformer_gib']} GiB bf16")
    print(f"{'method':10} {'total s':>8} {'calib s':>8} {'s/double':>9} {'s/single':>9} {'RSS GiB':>8} {'VRAM GiB':>9} {'out err':>8} {'latent err':>11} {'gen s (fp)':>12}")
    for method, r in rows.items():
        if "error" in r:
            print(f"{method:10} ERROR {r['error']}")
            continue
        dbl = statistics.median(r["block_s"][: args.double])
        sgl = statistics.median(r["block_s"][args.double : n])
        vram = max(r["peak_vram_gib"].values() or [0])
        print(f"{method:10} {r['seconds']:8.1f} {r['calibration_s']:8.1f} {dbl:9.2f} {sgl:9.2f} {r['peak_rss_gib']:8.2f} {vram:9.2f} "
              f"{r.get('transformer_out_rel_err', float('nan')):8.4f} {r.get('latent_rel_err', float('nan')):11.4f} {r.get('generate_s', 0):5.2f} ({r.get('fp_generate_s', 0):.2f})")
    measured = {m: r["block_errors"] for m, r in rows.items() if "block_errors" in r}
    if measured:
        print("\nper block, relative error vs the fp block at the first denoising step of the held-out prompts (image / text tokens):")
        print("local: the block on the fp block's inputs; chained: on the quantized pipeline's own inputs")
        print(f"{'block':>5} " + " ".join(f"{m + ' local':>22} {m + ' chained':>22}" for m in measured))
        for i in range(n):
            cells = [f"{e[i]['local_img']:.4f}/{e[i]['local_txt']:.4f}".rjust(22) + " " + f"{e[i]['chained_img']:.4f}/{e[i]['chained_txt']:.4f}".rjust(22)
                     for e in measured.values()]
            print(f"{i:5d} " + " ".join(cells))


if __name__ == "__main__":
    main()
