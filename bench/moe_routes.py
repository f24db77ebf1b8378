"""Which routes do AutoRound's training steps take, against the counts its experts are dealt out by?

Expert-parallel AutoRound (several processes) gives each process some of a MoE block's experts, dealt out by
routed pairs per expert (arch/expert_parallel.owners_by_load, from the runner's count on the fp block), and every
step each process waits at the all-to-alls for the busiest one. This runs AutoRound in one process on a
random-weight Qwen3-30B-A3B-shaped checkpoint (routers rewritten to route the text evenly,
`dist_gpu.whiten_routers`; `--moe_router random` keeps the random ones) and records, per block: the runner's fp
count (ctx.routed), the count with the attention at AutoRound's starting point (its round-to-nearest weights),
and every training step's routes (the router's top-k at the experts module, counted from its arguments). For 2 and
4 processes it prints the share of each step's pairs the busiest process would run under owners dealt by each
count (1 / N is even; the "steps" row deals by the steps' own mean, the best a deal by totals can do), and under a
deal that balances each calibration window's pairs (`owners_by_windows`, from per-window counts on the fp block: a
step sums its windows, so windows split evenly make every step even; not in lowbit yet: on synthetic routes with
windows as concentrated as these look, it moved the median busiest share of 2 processes 0.521 -> 0.514, the max
0.603 -> 0.568).

Measured (one H200, 2026-12-01, results/moe-routes-*.json): 29 % of the pairs go to another expert at the start
than in the fp block, yet no fixed deal brings the busiest of two processes below a median 53-54 % of a step's
pairs (its batches of 8 windows route unevenly themselves); dealing by the start's count moved the median by
-11 to +0.2 points between blocks and runs, and on two H200s the MoE pair got no faster with it (7.36 s per block
against 7.02 before, dist-gpu-2026-12-01-0116): it was not landed.

    python3 bench/moe_routes.py --text .cache/austen.txt --out $OUT --iters 200     # one GPU (as measured)
    python3 bench/moe_routes.py --text .cache/austen.txt --out /tmp/o --tiny --device cpu --iters 4   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_gpu import whiten_routers  # noqa: E402
from moe_scale import qwen3_30b_a3b  # noqa: E402
from vlm_scale import write_random_checkpoint, write_tokenizer  # noqa: E402


@torch.no_grad()
def routed_at_start(ctx) -> dict[str, list[int]]:
    """Routed pairs per expert with the block's other linears (the attention before the router) at AutoRound's
    starting point, their round-to-nearest weights (W_hat before the first step): the count the training
    steps would route by, if quantizing the attention moved nothing else."""
    from lowbit.arch.experts import expert_role
    from lowbit.calib.experts import count_routed
    from lowbit.quant import quantize_weight

    kept = {}
    try:
        for name, linear in ctx.linears.items():
            if expert_role(name) == name:  # not an expert's (experts only count here: their weights are not read)
                kept[name] = linear.weight.data
                linear.weight.data = quantize_weight(kept[name], ctx.schemes[name]).dequantize().to(kept[name])
        routed, _ = count_routed(ctx.engine, ctx.block, ctx.index, ctx.stream)
    finally:
        for name, weight in kept.items():
            ctx.linears[name].weight.data = weight
    return routed


@torch.no_grad()
def routed_per_window(ctx) -> dict[str, torch.Tensor]:
    """Each calibration window's routed pairs per expert on the fp block: experts module -> [windows, E] (one
    window per call, the experts only counting)."""
    from lowbit.arch.experts import experts_modules

    modules = experts_modules(ctx.block)
    out = {n: [] for n in modules}
    try:
        for m in modules.values():
            m.lowbit_count_only = True
        for i in range(ctx.n_samples):
            for m in modules.values():
                m.lowbit_routed = torch.zeros(m.lowbit_layout.num_experts, dtype=torch.int64, device=ctx.device)
            ctx.engine.call(ctx.block, ctx.index, ctx.stream, [i])
            for n, m in modules.items():
                out[n].append(m.lowbit_routed.cpu())
    finally:
        for m in modules.values():
            m.lowbit_routed, m.lowbit_count_only = None, False
    return {n: torch.stack(rows) for n, rows in out.items()}


def owners_by_windows(per_window: torch.Tensor, world: int, fixed: float = 0.4) -> list[int]:
    """A deal that balances every window's pairs, not only their sum: a step's load on a process is the sum over
    its windows, so with each window split evenly every step is. Each expert's cost per window is its pairs there
    plus its share of the fixed part owners_by_load counts (0.4 of a mean expert's pairs, spread over the windows);
    greedy, largest expert first, onto the process whose sum over windows of squared load grows least
    (argmin_p sum_w c[w, e] load[p, w]). per_window [W, E] -> each expert's process."""
    w_count, e_count = per_window.shape
    c = per_window.double() + fixed * float(per_window.sum()) / e_count / w_count  # [W, E]
    load = torch.zeros(world, w_count, dtype=torch.float64)  # [world, W]
    owners = [0] * e_count
    for e in sorted(range(e_count), key=lambda e: (-float(c[:, e].sum()), e)):
        p = min(range(world), key=lambda q: (float(c[:, e] @ load[q]), q))
        owners[e] = p
        load[p] += c[:, e]
    return owners


def busiest_share(owners: list[int], counts: torch.Tensor, world: int) -> float:
    """The share of one step's pairs [E] that the busiest of `world` processes runs."""
    per = torch.zeros(world, dtype=torch.float64).index_add_(0, torch.tensor(owners), counts.double())
    return float(per.max() / per.sum())


def recording(real_handler, records: list):
    """blockstep.handler_for wrapped: per block the fp count, the count at AutoRound's start and each step's routes."""
    from lowbit.arch.experts import experts_modules

    def handler_for(config):
        block_fn = real_handler(config)

        def fn(ctx, cfg):
            if not ctx.routed:
                return block_fn(ctx, cfg)
            record = {"block": ctx.index, "fp": ctx.routed, "start": routed_at_start(ctx), "windows": routed_per_window(ctx), "steps": {}}
            records.append(record)

            def count(name):
                def hook(module, args, kwargs):
                    if torch.is_grad_enabled():  # a training step's forward (the runner's passes run without grad)
                        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
                        seen = torch.bincount(index.flatten(), minlength=module.lowbit_layout.num_experts).cpu()
                        record["steps"].setdefault(name, []).append(seen)
                return hook

            handles = [m.register_forward_pre_hook(count(n), with_kwargs=True) for n, m in experts_modules(ctx.block).items()]
            try:
                return block_fn(ctx, cfg)
            finally:
                for h in handles:
                    h.remove()

        return fn

    return handler_for


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--moe_router", choices=["even", "random"], default="even")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--work", default="/tmp/moe-routes")
    args = p.parse_args()
    import lowbit
    import lowbit.blockstep as blockstep
    from lowbit.arch.expert_parallel import owners_by_load

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    text = Path(args.text).read_text(encoding="utf-8")
    ckpt = work / "qwen3-30b-a3b-shapes"
    t0 = time.time()
    write_random_checkpoint(qwen3_30b_a3b(args.blocks, args.tiny), ckpt)
    write_tokenizer(ckpt, text)
    router = whiten_routers(ckpt, text, args.device, seqlen=min(2048, args.seqlen)) if args.moe_router == "even" else {}
    written = time.time() - t0

    records: list = []
    real = blockstep.handler_for
    blockstep.handler_for = recording(real, records)
    try:
        t0 = time.time()
        lowbit.quantize(str(ckpt), lowbit.AutoRoundConfig(iters=args.iters), lowbit.Scheme(4, 128, True),
                        lowbit.CalibConfig(dataset=args.text, nsamples=args.nsamples, seqlen=args.seqlen, batch_size=8),
                        lowbit.RunConfig(output_dir=str(work / "out"), device=args.device), progress=False)
        ran = time.time() - t0
    finally:
        blockstep.handler_for = real

    rows, table = [], []
    for rec in records:
        for name, steps in rec["steps"].items():
            mean = torch.stack(steps).double().mean(0)
            deals = {"fp block (the deal lowbit makes)": rec["fp"][name], "attention at its start": rec["start"][name],
                     "steps' own mean (best fixed)": [round(float(c)) for c in mean]}
            for world in (2, 4):
                for how, counts in [*deals.items(), ("fp block, each window balanced", None)]:
                    owners = owners_by_load(counts, world) if counts is not None else owners_by_windows(rec["windows"][name], world)
                    shares = [busiest_share(owners, s, world) for s in steps]
                    row = {"block": rec["block"], "module": name, "processes": world, "dealt by": how,
                           "busiest share median": round(statistics.median(shares), 3), "max": round(max(shares), 3), "steps": len(shares)}
                    rows.append(row)
                    table.append(f"| {rec['block']} | {world} | {how} | {row['busiest share median']:.3f} | {row['max']:.3f} | {1 / world:.3f} |")
            moved = sum(abs(a - b) for a, b in zip(rec["fp"][name], rec["start"][name])) / 2
            rows.append({"block": rec["block"], "module": name, "pairs routed elsewhere at the start than in the fp block": moved,
                         "of": sum(rec["fp"][name])})
    env = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "checkpoint_s": round(written, 1),
           "quantize_s": round(ran, 1), "router": router}
    stamp = time.strftime("%Y-%m-%d-%H%M", time.gmtime())
    (out / f"moe-routes-{stamp}.json").write_text(json.dumps({"env": env, "args": vars(args), "rows": rows}, indent=1))
    print(json.dumps(env))
    for r in rows:
        if "of" in r:
            print(f"block {r['block']} {r['module']}: {r['pairs routed elsewhere at the start than in the fp block']:.0f} of {r['of']} pairs "
                  "routed to another expert at AutoRound's start than in the fp block")
    print(f"\nAutoRound {args.iters} steps per block, {args.nsamples} x {args.seqlen}, batch 8, W4 g128 sym, {args.moe_router} routers: "
          "share of each step's routed pairs on the busiest process, owners dealt by")
    print("| block | processes | dealt by | busiest share, median | max | even |\n|---|---|---|---|---|---|")
    print("\n".join(table))


if __name__ == "__main__":
    main()
