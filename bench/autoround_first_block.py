"""Where AutoRound's first block goes (one GPU): each torch.compile (seconds each), the setup, the first steps and
the steady blocks, for the lowbit CLI as it is (`as_is`: the single-linear grid compiled static, once per weight
shape) and with that grid compiled once with automatic dynamic shapes (`dynamic_grid`, symbolic N and G).
Measured on one H200 (results/autoround-first-block-2026-12-01-0109.json, whose "static_grid" is `as_is` here and
whose "as_is" is `dynamic_grid`: it was on main for an hour): Llama-3-8B's first block 27.5 -> 21.4 s, the blocks
after it 8.67 -> 8.77 s (steps 1.5 % slower, in both runs of the day); not landed, since the symbolic kernels cost
more than the compiles they save once a model has more than ~45 such blocks (a 70B's 80 larger ones).
Every run starts with empty inductor / triton caches, as a user's first run does, on a random-weight
Llama-3-8B-shaped checkpoint of `--blocks` blocks written first.

    python3 bench/autoround_first_block.py --text .cache/austen.txt --out $OUT
    python3 bench/autoround_first_block.py --text .cache/austen.txt --out /tmp/o --tiny --device cpu --iters 4   # CPU smoke test
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

CHILD = r"""
import json, sys, time
import torch
import lowbit.algorithms.autoround as ar
from torch._dynamo.utils import compilation_time_metrics

variant, out_json, ITERS, argv = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
if variant == "dynamic_grid":  # measured, not landed: the single-linear grid with automatic dynamic shapes
    real = ar.Compilers.grid_fns

    def fq_forward_one(x, v, s, z, maxq, out_dtype):  # code objects of their own: apart from the expert buffers' graphs
        return ar.fq_forward(x, v, s, z, maxq, out_dtype)

    def fq_backward_one(g, x, s, qz, inside):
        return ar.fq_backward(g, x, s, qz, inside)

    def grid_fns(self, compile_, device, many=False):
        if many or not (compile_ or (compile_ is None and device.type == "cuda")):
            return real(self, compile_, device, many)
        if self.grid is None:
            fns = (torch.compile(fq_forward_one), torch.compile(fq_backward_one))
            with torch.no_grad():  # as FakeQuant calls them; only N and G then become symbolic
                x = torch.randn(2, 2, 128, device=device)
                s, z = torch.ones(2, 2, 1, device=device), torch.zeros(2, 2, 1, device=device)
                _, qz, inside = fns[0](x, torch.zeros_like(x), s, z, 15, torch.float32)
                fns[1](torch.ones_like(x), x, s, qz, inside)
            self.grid = fns
        return self.grid

    ar.Compilers.grid_fns = grid_fns
events, t0 = [], time.perf_counter()
real_step, steps = ar.sign_sgd_step, [0]


def step(groups):
    real_step(groups)
    steps[0] += 1
    if steps[0] % ITERS in (1, 2, 3, 0):  # a block's first steps and its last
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        events.append((f"step {steps[0]}", round(time.perf_counter() - t0, 2)))


ar.sign_sgd_step = step
real_trainer = ar.Trainer.__init__


def trainer(self, *a, **k):
    events.append(("trainer built", round(time.perf_counter() - t0, 2)))
    real_trainer(self, *a, **k)


ar.Trainer.__init__ = trainer
import lowbit.cli
rc = lowbit.cli.main(argv)
json.dump({"rc": rc, "wall_s": round(time.perf_counter() - t0, 1), "events": events,
           "compiles_s": [round(x, 2) for x in compilation_time_metrics.get("_compile.compile_inner", [])],
           "inductor_s": [round(x, 2) for x in compilation_time_metrics.get("compile_fx_inner", [])]}, open(out_json, "w"))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--text", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--variants", default="as_is,dynamic_grid")
    p.add_argument("--work", default="/tmp/ar-first-block")
    args = p.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dist_gpu import llama3_8b
    from vlm_scale import write_random_checkpoint, write_tokenizer

    ckpt = Path(f"{work}-ckpt")
    shutil.rmtree(ckpt, ignore_errors=True)
    write_random_checkpoint(llama3_8b(args.blocks, args.tiny), ckpt)
    write_tokenizer(ckpt, Path(args.text).read_text(encoding="utf-8"))
    results = {}
    for variant in args.variants.split(","):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(work / "inductor"), TRITON_CACHE_DIR=str(work / "triton"), TORCH_LOGS="recompiles")
        cli = ["quantize", str(ckpt), "--scheme", "W4A16", "--group_size", "128", "--sym", "--format", "auto_round", "--output_dir", str(work / "out"),
               "--device", args.device, "--method", "autoround", "--iters", str(args.iters), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
               "--batch_size", "8", "--dataset", args.text, *(["--enable_torch_compile"] if args.device == "cpu" else [])]
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-c", CHILD, variant, str(work / "r.json"), str(args.iters), *cli], capture_output=True, text=True, env=env)
        r = json.loads((work / "r.json").read_text()) if proc.returncode == 0 else {"error": proc.stderr[-3000:]}
        r["process_s"] = round(time.time() - t0, 1)
        r["recompiles"] = [line[:300] for line in proc.stderr.splitlines() if "ecompil" in line][:30]
        log = json.loads((work / "out" / "lowbit_log.json").read_text()) if (work / "out" / "lowbit_log.json").exists() else {}
        r["block_seconds"], r["phases"] = log.get("block_seconds"), log.get("phases")
        r["block_losses"] = log.get("block_losses")
        results[variant] = r
        print(variant, json.dumps(r)[:3000], flush=True)
    stamp = time.strftime("%Y-%m-%d-%H%M", time.gmtime())
    import torch

    results["env"] = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (out / f"autoround-first-block-{stamp}.json").write_text(json.dumps(results, indent=1))
    print("| variant | process s | block 0 s | block 1 s | compiles (s each) | setup / train phases |\n|---|---|---|---|---|---|")
    for v in args.variants.split(","):
        r = results[v]
        bs = r.get("block_seconds") or []
        print(f"| {v} | {r['process_s']} | {bs[0] if bs else '?'} | {bs[1] if len(bs) > 1 else '?'} | {r.get('compiles_s')} | {r.get('phases')} |")


if __name__ == "__main__":
    main()
