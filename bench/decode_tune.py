"""Tune the small-M kernels on the shapes a decode step runs: Llama-3-8B's q/o (4096x4096), k/v (4096x1024),
gate/up (4096x14336) and down (14336x4096), at M = 1 (the GEMV) and M = 8 (the split-unpack dot).

Unlike bench/kernel_speed.py, which times one call after an L2 flush, each timing here is a chain of CHAIN
distinct layers of one shape replayed from one CUDA graph, as in a decode step: back-to-back launches, every
weight read from DRAM once. Reported per layer, against the same chain of fp16 nn.Linear weights (cuBLAS).
Every config is checked against an fp32 reference first. Prints the best configs per (shape, M) and a table
of pick_config vs the best vs fp16 last; writes bench/results/decode-tune-<date>.json.

    PYTHONPATH=src python bench/decode_tune.py [--chain 16] [--ms 1 8] [--unpack4 | --only-unpack4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, graph_replay_us, write_json  # noqa: E402
from kernel_speed import Layer, rel_err  # noqa: E402

from lowbit.kernels.triton.matmul import Config, pick_config, quant_matmul  # noqa: E402

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # (K, N)
# what lowbit.load runs on GPUs (fuse.py): q/k/v and gate/up concatenated along N
FUSED_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]


def chain_us(calls, reps: int = 30) -> float:
    """Median µs of one replay of `calls` (a list of thunks) captured in one CUDA graph."""

    def step():
        for c in calls:
            c()

    return graph_replay_us(step, reps)


def gemv_grid(k: int):
    for bn, warps in ((128, 1), (256, 2), (512, 4), (1024, 8)):
        for bk in (32, 64, 128):
            chunks = -(-k // bk)
            for split in (1, 2, 4, 8, 16, 32, 64):
                if chunks // split >= 1:
                    yield Config(1, bn, bk, split_k=split, num_warps=warps, num_stages=1, gemv=True)


def dot_grid(k: int, bits: int):
    bk = 512 // bits
    chunks = -(-k // bk)
    for bn in (32, 64, 128, 256):
        for split in (1, 2, 4, 8, 16, 32):
            for stages in (3, 4):
                if chunks // split >= 1:
                    yield Config(16, bn, bk, split_k=split, num_warps=4 if bn <= 128 else 8, num_stages=stages, split_unpack=True, magic=True)


def unpack4_grid(k: int):
    """The 4-bit split-unpack dot with unpack4.py's two-codes-per-instruction unpack (any M <= 16)."""
    for bk in (128,):  # 256-deep chunks ran out of shared memory or lost (H200, 2026-11-26)
        chunks = -(-k // bk)
        for bn, warps in ((128, 4), (256, 4), (256, 8)):
            for split in (1, 2, 4, 8, 16, 32, 64):
                for x_once in (False, True):
                    if chunks // split >= 1 and not (x_once and warps == 8):
                        yield Config(16, bn, bk, split_k=split, num_warps=warps, num_stages=3, split_unpack=True, unpack4=True, x_once=x_once)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chain", type=int, default=16)
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--unpack4", action="store_true", help="also time the unpack4 grid (4 bits)")
    ap.add_argument("--only-unpack4", action="store_true", help="time pick_config and the unpack4 grid only")
    ap.add_argument("--fused", action="store_true", help="the fused decode shapes (q/k/v, o, gate/up, down)")
    args = ap.parse_args()
    torch.cuda.set_device(0)
    env = environment()
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    results = {"env": env, "chain": args.chain, "bits": args.bits, "group_size": args.group_size, "rows": [],
               "command": "PYTHONPATH=src python3 bench/decode_tune.py " + " ".join(sys.argv[1:])}
    t0 = time.time()
    from lowbit.kernels.triton.matmul import gemv_config

    for k, n in FUSED_SHAPES if args.fused else SHAPES:
        layers = [Layer(k, n, args.bits, args.group_size, seed=i) for i in range(args.chain)]
        for m in args.ms:
            x = torch.randn(m, k, device="cuda").half()
            outs = [torch.empty(m, n, device="cuda", dtype=torch.half) for _ in layers]
            ref = x.float() @ layers[0].dequant()
            fp16 = chain_us([lambda l=l, o=o: torch.mm(x, l.w_fp16.t(), out=o) for l, o in zip(layers, outs)]) / args.chain

            def timed(cfg):
                got = quant_matmul(x, layers[0].packed, config=cfg)
                err = rel_err(got, ref)
                if err > 3e-3:
                    print(f"CHECK FAILED {cfg}: rel err {err:.2e}", flush=True)
                    return err, float("inf")
                return err, chain_us([lambda l=l, o=o: quant_matmul(x, l.packed, config=cfg, out=o) for l, o in zip(layers, outs)]) / args.chain

            picked = pick_config(m, n, k, args.bits, layers[0].gs, sm)
            err, ours = timed(picked)
            grid = [] if args.only_unpack4 else list(gemv_grid(k) if m == 1 else dot_grid(k, args.bits))
            if args.bits == 4 and (args.unpack4 or args.only_unpack4):
                grid += list(unpack4_grid(k))
            if m == 1 and args.only_unpack4:
                grid.append(gemv_config(m, n, k, sm))  # the GEMV the default table uses at M = 1 where K < 8192
            cands = []
            for cfg in grid:
                try:
                    e, t = timed(cfg)
                except Exception as exc:  # noqa: BLE001 - a config that fails to compile is reported and skipped
                    print(f"{cfg} failed: {str(exc)[:200]}", flush=True)
                    continue
                cands.append((t, repr(cfg), e))
            cands.sort()
            row = {"K": k, "N": n, "M": m, "fp16_us": fp16, "ours_us": ours, "ours_err": err, "ours_cfg": repr(picked),
                   "best": cands[:8], "all": cands}
            results["rows"].append(row)
            write_json("decode-tune", results)
            print(f"{k}x{n} M={m}: fp16 {fp16:.1f} us, pick_config {ours:.1f} us ({fp16 / ours:.2f}x), best {cands[0][0]:.1f} us "
                  f"({fp16 / cands[0][0]:.2f}x) {cands[0][1]}; {time.time() - t0:.0f}s", flush=True)
            for t, c, e in cands[:5]:
                print(f"    {t:7.1f} us  {c}", flush=True)
        del layers
        torch.cuda.empty_cache()
    print(f"\nDecode shapes, W{args.bits} g{args.group_size}, chain of {args.chain} layers in one CUDA graph, per layer; {env['gpus'][0]}, {env['date']}")
    print(f"{'KxN':>11} {'M':>3} {'fp16 us':>8} {'ours us':>8} {'x fp16':>7} {'best us':>8} {'x fp16':>7}")
    for r in results["rows"]:
        b = r["best"][0][0]
        print(f"{r['K']:>5}x{r['N']:<5} {r['M']:>3} {r['fp16_us']:8.1f} {r['ours_us']:8.1f} {r['fp16_us'] / r['ours_us']:7.2f} {b:8.1f} {r['fp16_us'] / b:7.2f}")


if __name__ == "__main__":
    main()
