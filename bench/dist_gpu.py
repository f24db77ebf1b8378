"""Data-parallel quantization on several GPUs: one process against `--nproc N` on a random-weight checkpoint with
Llama-3-8B block shapes (`--blocks` of its 32), through the CLI (GPTQ and AutoRound), wall time, peak RSS per
process and peak VRAM. Prints a table last and writes `dist-gpu-<date>.json` to --out.

    python3 bench/dist_gpu.py --text .cache/austen.txt --blocks 4 --nproc 2 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vlm_scale import write_random_checkpoint, write_tokenizer  # noqa: E402


def llama3_8b(blocks: int, tiny: bool = False):
    from transformers import LlamaConfig

    sizes = dict(vocab_size=8192, hidden_size=256, intermediate_size=512) if tiny else dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336)
    return LlamaConfig(**sizes, num_hidden_layers=blocks, num_attention_heads=32 if not tiny else 4, num_key_value_heads=8 if not tiny else 2,
                       max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])


def run(ckpt: Path, out: Path, args: list[str], device: str = "cuda") -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "lowbit.cli", "quantize", str(ckpt), "--scheme", "W4A16", "--group_size", "128", "--sym",
           "--format", "auto_round", "--output_dir", str(out), "--device", device, *args]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    print(" ".join(cmd[3:]), f"-> exit {proc.returncode} in {wall:.1f} s", proc.stderr[-1500:], sep="\n", flush=True)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300], "wall_s": round(wall, 1)}
    log = json.loads((out / "lowbit_log.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": round(wall, 1), "seconds": log["seconds"], "peak_rss_gib": round(log["peak_rss_bytes"] / 2**30, 2),
            "peak_vram_gib": {d: round(b / 2**30, 2) for d, b in log["peak_vram_bytes"].items()}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--text", required=True)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--methods", default="gptq,autoround")
    p.add_argument("--workdir", default="/tmp/dist-gpu")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy widths: a CPU smoke test of this script")
    args = p.parse_args()
    work = Path(args.workdir)
    ckpt = work / "llama3-8b-shapes"
    shutil.rmtree(ckpt, ignore_errors=True)
    nbytes = write_random_checkpoint(llama3_8b(args.blocks, args.tiny), ckpt)
    write_tokenizer(ckpt, Path(args.text).read_text(encoding="utf-8"))
    calib = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch_size", "8", "--dataset", args.text]
    methods = {"gptq": ["--method", "gptq"], "autoround": ["--method", "autoround", "--iters", str(args.iters), "--disable_torch_compile"]}
    rows = {}
    for m in args.methods.split(","):
        for n in (1, args.nproc):
            rows[f"{m} x{n}"] = run(ckpt, work / "out", methods[m] + calib + (["--nproc", str(n)] if n > 1 else []), args.device)
    env = {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [], "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "checkpoint_gib": round(nbytes / 2**30, 2), "blocks": args.blocks}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"dist-gpu-{time.strftime('%Y-%m-%d')}.json").write_text(json.dumps({"env": env, "args": vars(args), "rows": rows}, indent=2))
    print(f"\n{env}\n{'run':16} {'wall s':>7} {'quant s':>8} {'RSS GiB':>8}  VRAM GiB")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:16} ERROR {r['error']}")
        else:
            print(f"{name:16} {r['wall_s']:7.1f} {r['seconds']:8.1f} {r['peak_rss_gib']:8.2f}  {r['peak_vram_gib']}")


if __name__ == "__main__":
    main()
