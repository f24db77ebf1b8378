"""Several GPUs, one call: one process on one GPU, `--nproc N` data-parallel processes, and one process with the
block spread over two GPUs (`--device_map 0,1` with a `--max_memory` that does not hold the block on the
first), on random-weight checkpoints with Llama-3-8B shapes (and the data-parallel pair on Qwen3-30B-A3B
shapes), through the CLI; GPTQ and AutoRound at auto-round's defaults (W4A16 g128 sym, 200 iterations,
128 x 2048 samples, batch 8; eager, auto-round's default); auto-round 0.16.1's own `device_map="0,1"` beside
them when it is importable.

Checks first (the fused GPTQ column kernel against the CPU loop), then the runs in priority order, each
only if the time budget still holds it; outputs are compared (split vs one GPU, N processes vs one GPU)
before they are deleted. Per run: wall time (process start to exit), the run's own seconds, its block
loop, peak RSS per process and peak VRAM per GPU (every process's, from the run log). The table is printed
last; everything goes to `<out>/dist-gpu-<date>-<HHMM>.json` and the runs' logs to `<out>/dist-gpu-<date>-<HHMM>.log`.

    python3 bench/dist_gpu.py --text .cache/austen.txt --out $OUT --budget 430
    python3 bench/dist_gpu.py --text .cache/austen.txt --tiny --device cpu --out /tmp/o   # CPU smoke test
    # whole models (32 Llama-3-8B blocks; one call per method fits the 10-minute limit), and a profile of a pair:
    python3 bench/dist_gpu.py --text .cache/austen.txt --out $OUT --compile --skip_checks --only "llama autoround" --autoround_blocks 32 --gptq_blocks 1 --moe_blocks 0 --budget 585
    python3 bench/dist_gpu.py --text .cache/austen.txt --out $OUT --compile --skip_checks --only "qwen3-moe autoround" --moe_iters 200 --profile "qwen3-moe autoround | 2 processes"
    # a steady-state window (block 1, steps 50-69) of each rank: per-step busy / NCCL / idle and a chrome trace per rank
    python3 bench/dist_gpu.py --text .cache/austen.txt --out $OUT --compile --skip_checks --ways none --only "qwen3-moe autoround" --moe_blocks 2 --moe_router even --profile "qwen3-moe autoround | 2 processes" --profile_iters 200 --profile_window 250:20
    # MoE on the load trained routers give (`--moe_router even`: the random routers rewritten to route the text evenly)
    python3 bench/dist_gpu.py --text .cache/austen.txt --out $OUT --compile --skip_checks --only "qwen3-moe autoround" --moe_blocks 4 --moe_iters 200 --moe_router even --ways "one GPU,2 processes"

Each run compiles from scratch (its own inductor / triton caches).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vlm_scale import write_random_checkpoint, write_tokenizer  # noqa: E402

STARTED = time.time()
AR_ROW = "llama autoround | auto-round device_map=0,1"
FULL_DEPTH = {"llama": 32, "qwen3-moe": 48}  # Llama-3-8B, Qwen3-30B-A3B


def llama3_8b(blocks: int, tiny: bool = False):
    from transformers import LlamaConfig

    sizes = dict(vocab_size=8192, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2) if tiny else \
        dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
    return LlamaConfig(**sizes, num_hidden_layers=blocks, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
                       architectures=["LlamaForCausalLM"])


def view(ckpt: Path, target: Path, blocks: int) -> Path:
    """The first `blocks` blocks of `ckpt` as a checkpoint of their own: its config and an index naming only
    their tensors (and the non-block ones), over links to the same shard files."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    config = json.loads((ckpt / "config.json").read_text())
    config["num_hidden_layers"] = blocks
    (target / "config.json").write_text(json.dumps(config))
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    keep = {k: v for k, v in index["weight_map"].items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < blocks}
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": index["metadata"], "weight_map": keep}))
    for f in ckpt.iterdir():
        if f.name not in ("config.json", "model.safetensors.index.json"):
            (target / f.name).symlink_to(f)
    return target


class _Captured(Exception):
    """Raised by the router hook once it has its block's input: the blocks after it need not run."""


def whiten_routers(ckpt: Path, text: str, device: str, tokens: int = 32768, seqlen: int = 2048) -> dict:
    """Rewrite each MoE block's router so that it routes the calibration text evenly, as trained routers
    (with their load-balancing loss) roughly do. A random-weight checkpoint's hidden states share a few large
    directions, so its random router sends most tokens to the same experts (Qwen3-30B-A3B shapes: the busiest expert
    172-251k of 262k calibration tokens per block), and expert parallelism would be measured on a load no real
    model has. Per block in order (each sees the blocks before it already rewritten): x [N, H], the router's
    input on `tokens` tokens of the text; z = C^-1/2 x (C: x's covariance) has the identity covariance; each
    random router row, made orthogonal to z's mean and of unit norm, then gives every expert a logit with mean 0
    and variance 1 over the tokens, independent between experts (random rows in 2048 dimensions are near
    orthogonal). W <- W' C^-1/2. Returns the largest / median tokens per expert per block, before and after."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(ckpt)(text, return_tensors="pt").input_ids[0]
    ids = ids[: tokens // seqlen * seqlen].view(-1, seqlen)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, device_map=device).eval()
    layers = model.model.layers
    k = model.config.num_experts_per_tok

    def routed(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i's router input [N, H] float64 and its top-k expert counts [E]."""
        got = []

        def hook(module, args):
            got.append(args[0].reshape(-1, args[0].shape[-1]).double())
            raise _Captured

        handle = layers[i].mlp.gate.register_forward_pre_hook(hook)
        with torch.no_grad():
            for row in ids.split(4):
                try:
                    model(row.to(model.device))
                except _Captured:
                    pass
        handle.remove()
        x = torch.cat(got)
        logits = x @ layers[i].mlp.gate.weight.double().T
        return x, torch.bincount(logits.topk(k, -1).indices.reshape(-1), minlength=logits.shape[-1])

    report, new = {}, {}
    for i in range(len(layers)):
        x, before = routed(i)
        mean, cov = x.mean(0), torch.cov(x.T)
        values, vectors = torch.linalg.eigh(cov)
        inv_sqrt = vectors @ torch.diag(values.clamp(min=values.max() * 1e-6).rsqrt()) @ vectors.T  # C^-1/2 [H, H]
        mz = inv_sqrt @ mean
        mz = mz / mz.norm()
        w = layers[i].mlp.gate.weight.double()  # [E, H]
        w = w - (w @ mz)[:, None] * mz[None]
        w = w / w.norm(dim=1, keepdim=True)
        with torch.no_grad():
            layers[i].mlp.gate.weight.copy_(w @ inv_sqrt)
        new[f"model.layers.{i}.mlp.gate.weight"] = layers[i].mlp.gate.weight.detach().cpu().contiguous()
        after = routed(i)[1]
        report[i] = {"before_max_median": [int(before.max()), int(before.median())], "after_max_median": [int(after.max()), int(after.median())]}
    del model
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted({index[name] for name in new}):
        tensors = load_file(ckpt / shard)
        tensors.update({name: t.to(tensors[name].dtype) for name, t in new.items() if index[name] == shard})
        save_file(tensors, ckpt / shard)
    return report


def log_line(log: Path, text: str) -> None:
    print(text, flush=True)
    with open(log, "a") as f:
        f.write(text + "\n")


def run_cli(ckpt: Path, out: Path, args: list[str], device: str, log: Path, timeout: float, profile: Path | None = None, window: str = "") -> dict:
    """One `lowbit quantize` process (it re-launches itself with --nproc); its figures from its log.

    Each run compiles from scratch (its own empty inductor and triton caches): a run after another on the
    same machine would otherwise reuse the first one's compiled code and look faster than a user's first run.
    profile: a folder for torch.profiler's per-process tables (profile_site/sitecustomize.py), or None."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "lowbit.cli", "quantize", str(ckpt), "--scheme", "W4A16", "--group_size", "128", "--sym",
           "--format", "auto_round", "--output_dir", str(out), *(["--device", device] if "--device_map" not in args else []), *args]
    caches = out.parent / f"caches-{out.name}"
    shutil.rmtree(caches, ignore_errors=True)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(caches / "inductor"), TRITON_CACHE_DIR=str(caches / "triton"))
    if profile is not None:
        env.update(BENCH_PROFILE_OUT=str(profile), PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent / "profile_site"), env.get("PYTHONPATH", "")]))
        if window:
            env["BENCH_PROFILE_WINDOW"] = window
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        log_line(log, f"$ {' '.join(cmd[3:])}\n-> killed after {timeout:.0f} s (time budget)")
        return {"error": f"killed after {timeout:.0f} s (time budget)"}
    wall = time.time() - t0
    log_line(log, f"$ {' '.join(cmd[3:])}\n-> exit {proc.returncode} in {wall:.1f} s\n{proc.stderr[-2500:]}\n{proc.stdout[-1500:]}")
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300], "wall_s": round(wall, 1)}
    s = json.loads((out / "lowbit_log.json").read_text())
    ranks = s.get("ranks") or [{"rank": 0, "peak_rss_bytes": s["peak_rss_bytes"]}]
    return {
        "wall_s": round(wall, 1), "seconds": s["seconds"], "phases": s["phases"], "block_seconds": s["block_seconds"],
        "peak_rss_gib": [round(r["peak_rss_bytes"] / 2**30, 2) for r in ranks],
        "peak_vram_gib": {d: round(b / 2**30, 2) for d, b in s["peak_vram_bytes"].items() if b},
        "collective_s": [r.get("collective_seconds") for r in s.get("ranks", [])], "placements": s["placements"],
        "block_losses": s["block_losses"],
        # MoE: the routing load per experts module, [largest, median] calibration tokens per expert
        "routed_max_median": {m: [max(c), sorted(c)[len(c) // 2]] for m, c in s.get("experts_routed_tokens", {}).items() if c},
        # the block loop by phase, per process (one process: its own), and per block on rank 0
        "block_phases": [r["block_phases"] for r in s["ranks"]] if s.get("ranks") else [s.get("block_phases", {})],
        "block_phase_seconds": s.get("block_phase_seconds", []),
    }


def compare(a: Path, b: Path) -> dict:
    """Packed words and scales of two auto_round exports: the share of int32 words that differ and the
    largest relative scale difference (0 / 0.0: byte-identical tensors)."""
    from safetensors import safe_open

    def tensors(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            st = safe_open(f, "pt")
            out.update({k: (st, k) for k in st.keys() if k.endswith((".qweight", ".scales"))})
        return out

    ta, tb = tensors(a), tensors(b)
    if ta.keys() != tb.keys():
        return {"error": "different tensors"}
    words = differ = 0
    scale_rel = 0.0
    for name in ta:
        x, y = ta[name][0].get_tensor(name), tb[name][0].get_tensor(name)
        if name.endswith(".qweight"):
            words += x.numel()
            differ += int((x != y).sum())
        else:
            scale_rel = max(scale_rel, float(((x.float() - y.float()).abs() / x.float().abs().clamp(min=1e-8)).max()))
    return {"qweight_words_differing": round(differ / max(words, 1), 6), "max_scale_rel_diff": scale_rel}


def check_gptq_kernel(device: str) -> dict:
    """The fused GPTQ column kernel (CUDA) against the CPU loop on one random 1024 x 1024 layer."""
    from lowbit.algorithms.gptq import gptq_quantize
    from lowbit.config import Scheme

    if device == "cpu" or not torch.cuda.is_available():
        return {"skipped": "no GPU"}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 1024, generator=g) @ (torch.randn(1024, 1024, generator=g) / 32 + torch.eye(1024))
    h, w = 2 * x.t() @ x / 4096, torch.randn(1024, 1024, generator=g) * 0.02
    out = {}
    for act_order in (False, True):
        cpu, loss_cpu = gptq_quantize(w, h, Scheme(4, 128, True), act_order=act_order)
        gptq_quantize(w.cuda(), h.cuda(), Scheme(4, 128, True), act_order=act_order)  # Triton compiles here: not timed
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gpu, loss_gpu = gptq_quantize(w.cuda(), h.cuda(), Scheme(4, 128, True), act_order=act_order)
        torch.cuda.synchronize()
        out[f"act_order={act_order}"] = {"codes_equal": round(float((gpu.codes.cpu() == cpu.codes).float().mean()), 5),
                                         "loss_rel_diff": abs(loss_gpu - loss_cpu) / loss_cpu, "gpu_seconds": round(time.perf_counter() - t0, 3)}
    return out


def check_hessian(device: str) -> dict:
    """GPTQ's Hessian of bf16 inputs (the 16-bit GEMM with a float32 result, algorithms/gptq.gram) against the
    float64 X^T X of the same values and the float32 GEMM of the upcast inputs (the old path): the largest
    error relative to H's largest entry, and the seconds of each for down_proj's K = 14336 at 8 x 2048 rows
    (one batch)."""
    from lowbit.algorithms.gptq import gram

    if device == "cpu" or not torch.cuda.is_available():
        return {"skipped": "no GPU"}
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(16384, 1024, device="cuda", generator=g) * torch.rand(1024, device="cuda", generator=g) * 3).bfloat16()
    ref = x.double().t() @ x.double()
    err = {"gram_bf16_rel_err": float((gram(x).double() - ref).abs().max() / ref.abs().max()),
           "fp32_gemm_rel_err": float(((x.float().t() @ x.float()).double() - ref).abs().max() / ref.abs().max())}
    big = torch.randn(16384, 14336, device="cuda", generator=g).bfloat16()
    for name, fn in (("gram_bf16_s", lambda: gram(big)), ("fp32_gemm_s", lambda: big.float().t() @ big.float())):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        err[name] = round(time.perf_counter() - t0, 4)
    return err


def check_gptq_solve(device: str, tiny: bool = False) -> dict:
    """Where one GPTQ solve's seconds go, for the question the phase tables leave open (two processes halve the
    statistics but not the solve): the Hessian's inverse factor alone and the whole solve (gptq_quantize_many),
    for Llama-3-8B's down_proj (4096 x 14336) and its stacked q/k/v (6144 x 4096), with all rows (one process)
    and half of them (each of two). Warm calls (Triton compiled first), median of 3, synchronized."""
    from lowbit.algorithms.gptq import gptq_quantize_many, inverse_hessian_factor
    from lowbit.config import Scheme

    if device != "cpu" and not torch.cuda.is_available():
        return {"skipped": "no GPU"}
    dev = "cuda" if device != "cpu" else "cpu"
    shapes = {"down_proj": (4096, 14336), "qkv_stacked": (6144, 4096)} if not tiny else {"tiny": (64, 256)}
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def seconds(fn) -> float:
        fn()  # warm: compile, allocator
        times = []
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return round(sorted(times)[1], 4)

    out = {}
    g = torch.Generator(device=dev).manual_seed(0)
    for name, (n, k) in shapes.items():
        x = torch.randn(2 * k, k, device=dev, generator=g)
        h = x.t() @ x / (2 * k)  # [K, K] positive definite
        w = torch.randn(n, k, device=dev, generator=g) * 0.02
        out[name] = {"factor_s": seconds(lambda: inverse_hessian_factor(h, 0.01)),
                     "factor_before_s": seconds(lambda: factor_before(h, 0.01)),  # the path it replaced (stop 23)
                     "cholesky_s": seconds(lambda: torch.linalg.cholesky(h))}
        u0, u1 = factor_before(h, 0.01).double(), inverse_hessian_factor(h, 0.01).double()
        out[name]["factor_rel_diff"] = float((u0 - u1).abs().max() / u0.abs().max())
        for rows, label in ((n, "all_rows_s"), (n // 2, "half_rows_s")):
            out[name][label] = seconds(lambda: gptq_quantize_many(w[None, :rows], h[None], Scheme(4, 128, True)))
        if dev == "cuda":  # where the whole solve's GPU and host time go, by op
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                gptq_quantize_many(w[None], h[None], Scheme(4, 128, True))
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=48)
            out[name]["profile"] = table
            print(f"gptq solve profile, {name} {n} x {k}:\n{table}", flush=True)
        del x, h, w
    return out


def check_grouped_experts(device: str, tiny: bool = False) -> dict:
    """A Qwen3-30B-A3B experts layer (128 experts, 2048 -> 768 -> 2048, top 8) trained the way AutoRound trains
    it: forward and backward into every expert's weight, bf16, on one batch (8 x 2048 tokens: one process) and
    half of it (each of two), through the grouped GEMMs (arch/experts.dense_grouped_forward) and through the
    per-expert loop (forced by a hook); output and weight gradients compared, warm, median of 3."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from lowbit.arch.experts import dense_grouped_applies, unfuse_experts

    if device != "cpu" and not torch.cuda.is_available():
        return {"skipped": "no GPU"}
    dev = "cuda" if device != "cpu" else "cpu"
    e, h, i, k, tokens = (8, 64, 32, 2, 256) if tiny else (128, 2048, 768, 8, 16384)
    config = Qwen3MoeConfig(hidden_size=h, moe_intermediate_size=i, num_experts=e, num_experts_per_tok=k)
    with torch.device("meta"):
        holder = torch.nn.Sequential(Qwen3MoeExperts(config))
    unfuse_experts(holder)
    experts = holder[0].to_empty(device=dev).to(torch.bfloat16 if dev == "cuda" else torch.float32)
    g = torch.Generator(device=dev).manual_seed(0)
    for p in experts.parameters():
        p.data.normal_(0, 0.02, generator=g).requires_grad_(True)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    out = {}
    for n in (tokens, tokens // 2):
        x = torch.randn(n, h, device=dev, generator=g, dtype=getattr(experts, "0").gate_proj.weight.dtype)
        index = torch.rand(n, e, device=dev, generator=g).topk(k, dim=-1).indices  # [n, k] distinct experts
        weights = torch.rand(n, k, device=dev, generator=g).softmax(-1).to(x.dtype)

        def step():
            for p in experts.parameters():
                p.grad = None
            y = experts(x, index, weights)
            y.float().pow(2).mean().backward()
            return y

        def timed() -> tuple[float, torch.Tensor]:
            y = step()  # warm
            times = []
            for _ in range(3):
                sync()
                t0 = time.perf_counter()
                step()
                sync()
                times.append(time.perf_counter() - t0)
            return round(sorted(times)[1], 4), y

        grouped_s, y_grouped = timed()
        applies = dense_grouped_applies(experts, x)
        grads = torch.cat([p.grad.flatten().float() for p in experts.parameters()])
        handle = getattr(experts, "0").gate_proj.register_forward_pre_hook(lambda m, a: None)  # a watched linear: the loop
        try:
            loop_s, y_loop = timed()
            loop_grads = torch.cat([p.grad.flatten().float() for p in experts.parameters()])
        finally:
            handle.remove()
        out[f"{n}_tokens"] = {"grouped_s": grouped_s, "loop_s": loop_s, "speedup": round(loop_s / grouped_s, 2), "grouped_path": applies,
                              "out_rel_diff": float((y_grouped.detach().float() - y_loop.detach().float()).abs().max() / y_loop.detach().float().abs().max()),
                              "grad_rel_diff": float((grads - loop_grads).abs().max() / loop_grads.abs().max())}
    print(f"grouped experts: {json.dumps(out)}", flush=True)
    return out


def factor_before(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """GPTQ's inverse factor as lowbit computed it until stop 23 (and GPTQ's reference code does): Cholesky of
    H + damp I, the inverse from it, the upper Cholesky of that inverse."""
    hd = h + damp_percent * h.diagonal().mean() * torch.eye(h.shape[0], device=h.device)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)


AUTO_ROUND_CHILD = """
import json, sys, time, torch, resource
t0 = time.time()
import auto_round
from auto_round import AutoRound
from transformers import AutoModelForCausalLM, AutoTokenizer
sys.path.insert(0, {src!r})
from lowbit.calib.corpora import load_text
from lowbit.calib.samples import calibration_windows
from lowbit.config import CalibConfig
tok = AutoTokenizer.from_pretrained({ckpt!r})
windows = calibration_windows(tok, load_text({text!r}), CalibConfig(nsamples={nsamples}, seqlen={seqlen}))
model = AutoModelForCausalLM.from_pretrained({ckpt!r}, dtype=torch.bfloat16)
ar = AutoRound(model, tok, bits=4, group_size=128, sym=True, iters={iters}, nsamples={nsamples}, seqlen={seqlen}, batch_size=8,
               dataset=[w.unsqueeze(0) for w in windows], device_map={device_map!r})
ar.quantize()
print("RESULT", json.dumps({{"impl": "auto-round " + auto_round.__version__, "seconds": time.time() - t0,
      "peak_vram_gib": {{f"cuda:{{i}}": round(torch.cuda.max_memory_allocated(i) / 2**30, 2) for i in range(torch.cuda.device_count())}},
      "peak_rss_gib": [round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)]}}))
"""


def run_auto_round(ckpt: Path, args, device_map: str, log: Path, timeout: float) -> dict:
    code = AUTO_ROUND_CHILD.format(src=str(Path(__file__).resolve().parents[1] / "src"), ckpt=str(ckpt), text=args.text, nsamples=args.nsamples,
                                   seqlen=args.seqlen, iters=args.iters, device_map=device_map)
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        log_line(log, f"auto-round device_map={device_map}: killed after {timeout:.0f} s (time budget)")
        return {"error": f"killed after {timeout:.0f} s (time budget)"}
    wall = time.time() - t0
    log_line(log, f"auto-round device_map={device_map}: exit {proc.returncode} in {wall:.1f} s\n{proc.stderr[-2500:]}")
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300], "wall_s": round(wall, 1)}
    return {"wall_s": round(wall, 1), **json.loads(line[7:])}


def auto_round_row(results: dict, ckpt: Path, args, log: Path) -> None:
    """auto-round's own `device_map="0,1"` on the Llama AutoRound checkpoint, when its package imports here."""
    left = args.budget - (time.time() - STARTED)
    if args.device != "cuda" or torch.cuda.device_count() < 2:
        return
    try:
        import auto_round  # noqa: F401

        ok = left > 120
    except Exception as err:  # noqa: BLE001 - missing, or its dependencies do not import here
        ok, results["rows"][AR_ROW] = False, {"skipped": f"auto-round not importable ({type(err).__name__}: {str(err)[:200]})"}
    if ok:
        results["rows"][AR_ROW] = run_auto_round(ckpt, args, "0,1", log, timeout=left - 5)
    elif AR_ROW not in results["rows"]:
        results["rows"][AR_ROW] = {"skipped": f"{left:.0f} s left of the budget"}


def fmt_row(name: str, r: dict, base: dict | None) -> str:
    if "error" in r:
        return f"| {name} | error: {r['error']} |"
    if "skipped" in r:
        return f"| {name} | skipped: {r['skipped']} |"
    loop = r.get("phases", {}).get("blocks")
    steady = r.get("block_seconds", [])[1:]  # block 0 also pays the first-use costs
    per_block = sorted(steady)[len(steady) // 2] if steady else None
    speed = ""
    if base and "error" not in base and r is not base and "phases" in base:
        b_steady = sorted(base["block_seconds"][1:])[len(base["block_seconds"][1:]) // 2] if base["block_seconds"][1:] else None
        speed = f"{base['wall_s'] / r['wall_s']:.2f}x"  # wall; a peer's row (auto-round) has only this
        if loop:
            speed += f" / {base['phases']['blocks'] / loop:.2f}x" + (f" / {b_steady / per_block:.2f}x" if per_block and b_steady else "")
        if per_block and b_steady:  # projected to the real depth: everything outside the block loop + the loop's first block + the rest at the median
            depth = FULL_DEPTH[name.split()[0]]

            def full(x, med):
                return x["wall_s"] - x["phases"]["blocks"] + x["block_seconds"][0] + (depth - 1) * med

            speed += f" / {full(base, b_steady) / full(r, per_block):.2f}x"
    vram = ", ".join(f"{d} {v}" for d, v in r.get("peak_vram_gib", {}).items())
    return (f"| {name} | {r['wall_s']:.1f} | {r.get('seconds', 0):.1f} | {loop if loop is None else round(loop, 1)} | "
            f"{per_block if per_block is None else round(per_block, 2)} | {speed} | {' / '.join(str(x) for x in r['peak_rss_gib'])} | {vram} |")


def phase_table(results: dict) -> list[str]:
    """Per model and method: the run outside the block loop (startup: interpreter, imports, launch; setup; claim;
    capture; finish) and the block loop by phase, one GPU against each of the N processes: where the per-block
    time that does not halve goes."""
    out = []
    for key in dict.fromkeys(n.split(" | ")[0] for n in results["rows"]):
        cols = [(how, r) for n, r in results["rows"].items() if n.startswith(key + " | ") and "block_phases" in r for how in [n.split(" | ")[1]]]
        if len(cols) < 2:
            continue
        heads = [f"{how} rank {i}" if len(r["block_phases"]) > 1 else how for how, r in cols for i in range(len(r["block_phases"]))]
        per = [(r, i) for _, r in cols for i in range(len(r["block_phases"]))]
        outside = ["startup", "setup", "claim", "capture", "finish"]
        inside = sorted({p for r, i in per for p in r["block_phases"][i]}, key=lambda p: -max(r["block_phases"][i].get(p, 0) for r, i in per))
        out += [f"\n{key}: seconds per phase (outside the loop: rank 0's; the block loop: each process's own, exclusive)",
                "| phase | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
        out += [f"| {p} | " + " | ".join(f"{r['phases'].get(p, 0):.2f}" for r, _ in per) + " |" for p in outside]
        out += [f"| block loop: {p} | " + " | ".join(f"{r['block_phases'][i].get(p, 0):.2f}" for r, i in per) + " |" for p in inside]
        out.append("| wall | " + " | ".join(f"{r['wall_s']:.1f}" for r, _ in per) + " |")
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--text", required=True)
    p.add_argument("--gptq_blocks", type=int, default=6)
    p.add_argument("--autoround_blocks", type=int, default=2)
    p.add_argument("--moe_blocks", type=int, default=2, help="Qwen3-30B-A3B-shaped blocks (0: no MoE runs)")
    p.add_argument("--moe_router", choices=["random", "even"], default="random",
                   help="the MoE checkpoint's routers: random weights (most tokens to a few experts) or rewritten to route the text evenly (whiten_routers)")
    p.add_argument("--moe_iters", type=int, default=50, help="AutoRound iterations on the MoE blocks")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--gptq_args", default="", help="more flags for the GPTQ rows, e.g. '--no_true_sequential'")
    p.add_argument("--split_max_memory", default="8GiB,120GiB", help="caps that spread the block over two GPUs")
    p.add_argument("--budget", type=float, default=430, help="seconds for the whole call; runs that would not fit are skipped")
    p.add_argument("--workdir", default="/tmp/dist-gpu")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy widths: a CPU smoke test of this script")
    p.add_argument("--compile", action="store_true", help="AutoRound with lowbit's default on CUDA (compiled block and grid), not eager")
    p.add_argument("--checks_only", action="store_true", help="the checks (kernel, Hessian, solve profile) and no runs")
    p.add_argument("--skip_checks", action="store_true", help="the runs only (a short call re-measuring some rows)")
    p.add_argument("--repeats", type=int, default=1, help="run the chosen rows this many times, in turn (rows of noisy runs: '#2', '#3', ...)")
    p.add_argument("--ways", default="", help="comma list of ways to keep, e.g. 'one GPU' (default: all)")
    p.add_argument("--profile", default="", help="comma list of rows to run once more under torch.profiler, after the timed runs "
                   "(e.g. 'qwen3-moe autoround | 2 processes'); tables to <out>/profile-<row>-rank<R>.txt")
    p.add_argument("--profile_iters", type=int, default=20, help="AutoRound iterations of the profiled runs")
    p.add_argument("--profile_window", default="", help="FIRST:COUNT: profile only AutoRound steps FIRST..FIRST+COUNT of the run (all blocks "
                   "counted; e.g. 250:20 with --profile_iters 200: block 1, steady state) and write each rank's chrome trace "
                   "(profile_site/sitecustomize.py)")
    p.add_argument("--only", default="", help="comma list of runs to keep, e.g. 'llama gptq,qwen3-moe gptq' (default: all)")
    args = p.parse_args()
    date = time.strftime("%Y-%m-%d-%H%M", time.gmtime())  # several runs a day keep their own files
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log, result_file = out_dir / f"dist-gpu-{date}.log", out_dir / f"dist-gpu-{date}.json"
    work = Path(args.workdir)
    import transformers
    import triton

    env = {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [],
           "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count()}
    results = {"env": env, "args": vars(args), "checks": {}, "rows": {}}

    def save():
        result_file.write_text(json.dumps(results, indent=2))

    if not args.skip_checks:
        results["checks"]["gptq_kernel"] = check_gptq_kernel(args.device)
        results["checks"]["gptq_hessian"] = check_hessian(args.device)
        results["checks"]["gptq_solve"] = check_gptq_solve(args.device, tiny=args.tiny)
        results["checks"]["grouped_experts"] = check_grouped_experts(args.device, tiny=args.tiny)
    save()
    if args.checks_only:
        print(json.dumps({k: v for k, v in results["checks"].items()}, indent=1, default=str))
        return
    t0 = time.time()
    from moe_scale import qwen3_30b_a3b

    full = work / "llama3-8b-shapes"
    shutil.rmtree(full, ignore_errors=True)
    env["llama_checkpoint_gib"] = round(write_random_checkpoint(llama3_8b(max(args.gptq_blocks, args.autoround_blocks), args.tiny), full) / 2**30, 2)
    write_tokenizer(full, Path(args.text).read_text(encoding="utf-8"))
    ckpts = {("llama", "gptq"): view(full, work / "gptq-view", args.gptq_blocks), ("llama", "autoround"): view(full, work / "autoround-view", args.autoround_blocks)}
    if args.moe_blocks:
        moe = work / "qwen3-30b-a3b-shapes"
        shutil.rmtree(moe, ignore_errors=True)
        env["moe_checkpoint_gib"] = round(write_random_checkpoint(qwen3_30b_a3b(args.moe_blocks, args.tiny), moe) / 2**30, 2)
        write_tokenizer(moe, Path(args.text).read_text(encoding="utf-8"))
        if args.moe_router == "even":
            env["moe_router_tokens_per_expert"] = whiten_routers(moe, Path(args.text).read_text(encoding="utf-8"), args.device)
        ckpts[("qwen3-moe", "gptq")] = ckpts[("qwen3-moe", "autoround")] = moe
    env["checkpoint_write_s"] = round(time.time() - t0, 1)

    eager = [] if args.compile else ["--disable_torch_compile"]
    calib = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch_size", "8", "--dataset", args.text]
    gptq = ["--method", "gptq", *args.gptq_args.split()]
    methods = {("llama", "gptq"): gptq, ("qwen3-moe", "gptq"): gptq,
               ("llama", "autoround"): ["--method", "autoround", "--iters", str(args.iters), *eager],
               ("qwen3-moe", "autoround"): ["--method", "autoround", "--iters", str(args.moe_iters), *eager]}
    one_device = "cuda:0" if args.device == "cuda" else "cpu"
    procs = f"{args.nproc} processes"
    ways = {  # how -> (extra args, expected wall as a multiple of the one-GPU run's; None: the first run)
        "one GPU": ([], None),
        # expected: the block loop divided, what is outside it not (0.9 skipped a 32-block pair that fitted: 19:00)
        procs: (["--nproc", str(args.nproc), *(["--device_map", ",".join(str(i) for i in range(args.nproc))] if args.device == "cuda" else [])], 0.15 + 0.6 / args.nproc),
        "block split over 2 GPUs": (["--device_map", "0,1" if args.device == "cuda" else "cpu,cpu", "--max_memory", args.split_max_memory if args.device == "cuda" else "1B,8GiB"], 1.3),
    }
    # priority order: the data-parallel pairs (the speed-up), one block split, auto-round beside them, the slow MoE AutoRound pair
    order = [("llama", "gptq", "one GPU"), ("llama", "gptq", procs), ("llama", "autoround", "one GPU"), ("llama", "autoround", procs)]
    if args.moe_blocks:
        order += [("qwen3-moe", "gptq", "one GPU"), ("qwen3-moe", "gptq", procs)]
    order += [("llama", "gptq", "block split over 2 GPUs"), ("llama", "autoround", "auto-round")]
    if args.moe_blocks:
        order += [("qwen3-moe", "autoround", "one GPU"), ("qwen3-moe", "autoround", procs)]
    order += [("llama", "autoround", "block split over 2 GPUs")]
    if args.only:
        order = [o for o in order if f"{o[0]} {o[1]}" in args.only.split(",")]
    if args.ways:
        order = [o for o in order if o[2] in args.ways.split(",")]
    outputs = {}
    for rep, (model, method, how) in [(rep, o) for rep in range(args.repeats) for o in order]:
        if how == "auto-round":
            if rep == 0:
                auto_round_row(results, ckpts[(model, method)], args, log)
                save()
            continue
        extra, factor = ways[how]
        suffix = f" #{rep + 1}" if rep else ""  # a repeat of the same rows, in turn: the noise between runs
        row = f"{model} {method} | {how}{suffix}"
        left = args.budget - (time.time() - STARTED)
        base = results["rows"].get(f"{model} {method} | one GPU{suffix}")
        need = 60 if factor is None or base is None or "wall_s" not in base else factor * base["wall_s"] + 15
        if left < need:
            results["rows"][row] = {"skipped": f"{left:.0f} s left of the budget, about {need:.0f} s needed"}
            continue
        out = work / f"out-{model}-{method}-{how.split()[0]}"
        results["rows"][row] = run_cli(ckpts[(model, method)], out, methods[(model, method)] + calib + extra, one_device, log, timeout=left - 5)
        if rep:
            shutil.rmtree(out, ignore_errors=True)
        elif (out / "lowbit_log.json").exists():
            outputs[(model, method, how)] = out
            if how != "one GPU" and (model, method, "one GPU") in outputs:
                results["checks"][f"{model} {method}: {how} vs one GPU"] = compare(outputs[(model, method, "one GPU")], out)
                shutil.rmtree(out, ignore_errors=True)
        save()
    save()
    for row in filter(None, args.profile.split(",")):
        model_method, how = (x.strip() for x in row.split("|"))
        model, method = model_method.split()
        run_args = [a if prev != "--iters" else str(args.profile_iters) for prev, a in zip(["", *methods[(model, method)]], methods[(model, method)])]
        folder = work / "profile"
        shutil.rmtree(folder, ignore_errors=True)
        out = work / f"out-profile-{model}-{method}"
        results["profiles"] = results.get("profiles", {})
        results["profiles"][row] = run_cli(ckpts[(model, method)], out, run_args + calib + ways[how][0], one_device, log, timeout=max(60, args.budget - (time.time() - STARTED)), profile=folder, window=args.profile_window)
        shutil.rmtree(out, ignore_errors=True)
        tag = row.replace(" | ", "-").replace(" ", "_")
        for f in sorted(folder.glob("profile-*rank*.txt")):
            text = f.read_text()
            (Path(args.out) / f"profile-{tag}-{f.stem.removeprefix('profile-')}.txt").write_text(text)
            print(f"\n== profile {row} {f.stem}: {text.splitlines()[0]}")
        for f in sorted(folder.glob("trace-rank*.json.gz")):  # --profile_window: each rank's chrome trace
            shutil.copy(f, Path(args.out) / f"trace-{tag}-{f.name.removeprefix('trace-')}")
        save()

    print(f"\n{json.dumps(env)}\nchecks: {json.dumps(results['checks'])}")
    print(f"\nLlama-3-8B shapes: GPTQ {args.gptq_args} on {args.gptq_blocks} blocks, AutoRound ({args.iters} iterations) on {args.autoround_blocks}; Qwen3-30B-A3B shapes: "
          f"{args.moe_blocks} blocks, AutoRound {args.moe_iters} iterations. {args.nsamples} x {args.seqlen}, batch 8, W4 g128 sym, AutoRound {'compiled' if args.compile else 'eager'}. "
          "Speed-up vs one GPU: wall / block loop / median block after the first / projected to the real depth (32 or 48 blocks: "
          "the run outside its block loop + its first block + the rest at the median; a projection, not a measurement).")
    print("| run | wall s | run s | block loop s | s per block | speed-up | peak RSS GiB (per process) | peak VRAM GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results["rows"].items():
        suffix = " #" + name.rsplit(" #", 1)[1] if " #" in name else ""
        print(fmt_row(name, r, results["rows"].get(f"{name.split(' | ')[0]} | one GPU{suffix}")))
    print("\n".join(phase_table(results)))


if __name__ == "__main__":
    main()
