"""Peak RAM of a quantization run against the size of the checkpoint it reads.

Writes a random-weight Llama-shaped fp16 checkpoint to disk one block at a time (never the whole model in
RAM), then quantizes it in a child process, RTN first and then with calibration on (AutoRound with a
token budget sized for a CPU), and reports each run's peak RSS (the child's ru_maxrss) next to the
checkpoint's size. Prints a table last and writes bench/results/memory-<host>-<date>.json.

    python bench/memory.py                       # 20 blocks of Llama-2-7B width: ~9 GB checkpoint
    python bench/memory.py --layers 4 --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def write_random_checkpoint(path: Path, layers: int, hidden: int, intermediate: int, kv_heads: int, heads: int, vocab: int) -> int:
    """A LlamaForCausalLM checkpoint with random fp16 weights, one safetensors shard per block."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from lowbit.model.source import resolve_model

    path.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        tie_word_embeddings=False, dtype="float16", architectures=["LlamaForCausalLM"],
    )
    config.save_pretrained(path)
    # the default model's tokenizer (49152 tokens) so the calibrated run can tokenize real text
    for f in resolve_model("default").glob("tokenizer*"):
        shutil.copy(f, path / f.name)
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: (torch.randn(*shape, generator=gen) * 0.02).half()  # noqa: E731
    weight_map = {}

    def shard(name: str, tensors: dict):
        save_file(tensors, path / name)
        weight_map.update({k: name for k in tensors})

    shard("embed.safetensors", {"model.embed_tokens.weight": rand(vocab, hidden)})
    for i in range(layers):
        p = f"model.layers.{i}."
        shard(f"block-{i:03d}.safetensors", {
            p + "self_attn.q_proj.weight": rand(hidden, hidden),
            p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, hidden),
            p + "mlp.gate_proj.weight": rand(intermediate, hidden),
            p + "mlp.up_proj.weight": rand(intermediate, hidden),
            p + "mlp.down_proj.weight": rand(hidden, intermediate),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.float16),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.float16),
        })
    shard("head.safetensors", {"model.norm.weight": torch.ones(hidden, dtype=torch.float16), "lm_head.weight": rand(vocab, hidden)})
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


CHILD = """
import json, resource, sys, lowbit
method, out, src, extra = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
m = lowbit.AutoRoundConfig(iters=extra["iters"]) if method == "autoround" else "rtn"
calib = lowbit.CalibConfig(nsamples=extra["nsamples"], seqlen=extra["seqlen"], batch_size=extra["nsamples"])
s = lowbit.quantize(src, m, lowbit.Scheme(4, 128, False), calib=calib, run=lowbit.RunConfig(output_dir=out, device="cpu", overwrite=True), progress=False)
print(json.dumps({"seconds": s.seconds, "sampled_peak_rss": s.peak_rss, "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "quantized": len(s.quantized), "output_bytes": s.output_bytes}))
"""


def run_child(method: str, src: Path, out: Path, extra: dict) -> dict:
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD, method, str(out), str(src), json.dumps(extra)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method} run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.time() - started
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/lowbit-membench")
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv_heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--iters", type=int, default=1, help="AutoRound steps per block in the calibrated run (CPU budget)")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--skip_calibrated", action="store_true")
    args = ap.parse_args()

    work = Path(args.workdir)
    src = work / "random-llama"
    if not (src / "model.safetensors.index.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        print(f"writing a random {args.layers}-block checkpoint to {src} ...", flush=True)
        write_random_checkpoint(src, args.layers, args.hidden, args.intermediate, args.kv_heads, args.heads, args.vocab)
    ckpt_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    block_bytes = (src / "block-000.safetensors").stat().st_size
    extra = {"iters": args.iters, "nsamples": args.nsamples, "seqlen": args.seqlen}
    rows = []
    for method in ("rtn",) + (() if args.skip_calibrated else ("autoround",)):
        print(f"quantizing with {method} ...", flush=True)
        r = run_child(method, src, work / f"out-{method}", extra)
        r.update(method=method, ratio=ckpt_bytes / r["ru_maxrss"])
        rows.append(r)
        shutil.rmtree(work / f"out-{method}", ignore_errors=True)

    result = {
        "date": datetime.date.today().isoformat(),
        "host": platform.node(),
        "cpu_count": __import__("os").cpu_count(),
        "torch": torch.__version__,
        "checkpoint_bytes": ckpt_bytes,
        "block_bytes_fp16": block_bytes,
        "shape": vars(args),
        "runs": rows,
    }
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"memory-cpu-{result['date']}.json").write_text(json.dumps(result, indent=2))
    gib = lambda b: f"{b / 1024**3:.2f}"  # noqa: E731
    print(f"\ncheckpoint {gib(ckpt_bytes)} GiB ({args.layers} blocks of {gib(block_bytes)} GiB fp16), {platform.node()}, torch {torch.__version__}")
    print("| method | calibration | peak RSS GiB | checkpoint / peak RSS | time s |")
    print("|---|---|---|---|---|")
    for r in rows:
        cal = "none" if r["method"] == "rtn" else f"{args.nsamples} x {args.seqlen} tokens, {args.iters} iter"
        print(f"| {r['method']} | {cal} | {gib(r['ru_maxrss'])} | {r['ratio']:.1f}x | {r['wall_seconds']:.0f} |")


if __name__ == "__main__":
    main()
