"""Accuracy of RTN, lowbit's AutoRound and the auto-round package on SmolLM2 (ANCHORS protocol).

One run per invocation, written to bench/results/accuracy-<method>-w<bits>g<gs>[-s<seed>].json; `--table`
builds the markdown table from every JSON there. Calibration: the "austen" text (Emma + Mansfield Park),
the first `nsamples` windows of `seqlen` tokens, the SAME token windows for both AutoRound implementations.
Evaluation: `lowbit.eval.perplexity` on "austen-eval" (Pride and Prejudice, 40 x 512) and on "kjv".

    python bench/accuracy.py --method ours --bits 4 --group 128 --seed 42
    python bench/accuracy.py --method ref --bits 4 --group 128      # auto-round 0.16.1, in-process
    python bench/accuracy.py --method rtn --bits 4 --group 128
    python bench/accuracy.py --table > docs/accuracy-table.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
EVAL_TEXTS = ("austen-eval", "kjv")


def evaluate(model, tokenizer) -> dict[str, float]:
    from lowbit.calib.corpora import load_text
    from lowbit.eval.perplexity import perplexity

    return {name: perplexity(model, tokenizer, load_text(name)) for name in EVAL_TEXTS}


def dequantized_model(out: Path):
    """The written export as an fp32 model with plain nn.Linear layers holding the dequantized weights.

    Reads the export back through `lowbit.load` (so the numbers are those of the written checkpoint: the
    quantized linears *and* every other tensor, such as norms that AWQ folded its scales into) and swaps each
    QuantLinear for an nn.Linear holding its weight dequantized once: QuantLinear's CPU forward re-dequantizes
    on every call, which is far too slow for 80 evaluation windows on 2 cores.
    """
    import lowbit
    from lowbit.kernels.linear import QuantLinear

    model = lowbit.load(str(out), dtype=torch.float32)
    swaps = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert swaps, "no quantized linear in the export"
    for name, q in swaps:
        linear = torch.nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
        linear.weight.data = q.dequantize_weight(torch.float32)
        if q.bias is not None:
            linear.bias.data = q.bias.data.float()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model.float().eval()


def run_lowbit(args, method) -> dict:
    import lowbit

    scheme = lowbit.Scheme(bits=args.bits, group_size=args.group, sym=False)
    calib = lowbit.CalibConfig(dataset="austen", nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q"
        t0 = time.time()
        summary = lowbit.quantize("default", method, scheme, calib=calib, run=lowbit.RunConfig(output_dir=str(out), device=args.device), progress=False)
        seconds = time.time() - t0
        from transformers import AutoTokenizer

        model = dequantized_model(out).to(args.device)
        tokenizer = AutoTokenizer.from_pretrained(out)
        ppl = evaluate(model, tokenizer)
    losses = [list(x) for x in summary.block_losses]
    return {"quantize_seconds": seconds, "ppl": ppl, "block_losses": losses}


def run_reference(args) -> dict:
    """auto-round from PyPI, in-process, fed our own token windows (it cannot download a dataset here)."""
    import auto_round
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.calib.corpora import load_text
    from lowbit.calib.samples import calibration_windows
    from lowbit.config import CalibConfig
    from lowbit.model import resolve_model

    path = resolve_model("default")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    windows = calibration_windows(tokenizer, load_text("austen"), CalibConfig(nsamples=args.nsamples, seqlen=args.seqlen))
    dataset = [w.unsqueeze(0) for w in windows]  # a list of [1, seqlen] token tensors
    t0 = time.time()
    ar = AutoRound(
        model, tokenizer, bits=args.bits, group_size=args.group, sym=False, iters=args.iters,
        nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size, dataset=dataset, seed=args.seed,
    )
    model, _ = ar.quantize()  # leaves the fake-quantized (quantize-dequantize) weights in the model
    seconds = time.time() - t0
    model = model.float().eval().to(args.device)
    return {"quantize_seconds": seconds, "ppl": evaluate(model, tokenizer), "auto_round_version": auto_round.__version__}


def run_fp(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.model import resolve_model

    path = resolve_model("default")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(args.device)
    return {"quantize_seconds": 0.0, "ppl": evaluate(model, AutoTokenizer.from_pretrained(path))}


LIGHT = dict(iters=50, nsamples=32, seqlen=512, batch_size=4)  # the CPU settings (the defaults of this script)


def result_name(args) -> str:
    """accuracy-<method>-w<b>g<g>[-s<seed>][-<device>][-i<iters>n<nsamples>x<seqlen>b<batch>].json; the CPU and
    the light settings (the first runs) carry no suffix."""
    device = "" if args.device == "cpu" else f"-{args.device}"
    if args.method == "fp":
        return f"accuracy-fp{device}.json"
    seed = f"-s{args.seed}" if args.method != "rtn" else ""
    light = all(getattr(args, k) == v for k, v in LIGHT.items()) or args.method == "rtn"
    settings = "" if light else f"-i{args.iters}n{args.nsamples}x{args.seqlen}b{args.batch_size}"
    return f"accuracy-{args.method}-w{args.bits}g{args.group}{seed}{device}{settings}.json"


def run(args) -> None:
    import lowbit

    torch.manual_seed(args.seed)
    if args.method == "rtn":
        out = run_lowbit(args, "rtn")
    elif args.method == "ours":
        # auto-round's own default step (1/iters, which the reference run gets) for a like-for-like comparison;
        # lowbit's default is capped at 5e-3 below 200 iterations (config.AutoRoundConfig.lr)
        out = run_lowbit(args, lowbit.AutoRoundConfig(iters=args.iters, lr=1.0 / args.iters, seed=args.seed))
    elif args.method == "ref":
        out = run_reference(args)
    else:
        out = run_fp(args)
    out.update(
        method=args.method, bits=args.bits, group_size=args.group, sym=False, seed=args.seed, iters=args.iters,
        nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size, torch=torch.__version__,
        threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(), device=args.device,
        gpu=torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    path = results / result_name(args)
    path.write_text(json.dumps(out, indent=2))
    print(f"{path.name}: {json.dumps(out['ppl'])} in {out['quantize_seconds']:.0f}s")


LABELS = {"rtn": "RTN", "ours": "lowbit AutoRound", "ref": "auto-round 0.16.1 AutoRound"}


def table(device: str = "cpu") -> str:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("accuracy-*.json"))]
    rows = [r for r in rows if isinstance(r, dict) and r.get("method") in ("fp", *LABELS) and "ppl" in r]  # other benches share the folder
    rows = [r for r in rows if r.get("device", "cpu") == device]
    fp = next((r for r in rows if r["method"] == "fp"), None)
    lines = [
        "| scheme | method | settings (iters, samples x seqlen, batch) | seed | austen-eval ppl | kjv ppl | quantize time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    if fp:
        lines.append(f"| fp32 | unquantized | - | - | {fp['ppl']['austen-eval']:.2f} | {fp['ppl']['kjv']:.2f} | - |")
    order = {"rtn": 0, "ref": 1, "ours": 2}
    key = lambda r: (-r["bits"], r["method"] != "rtn", r["iters"] * r["nsamples"], order[r["method"]], r["seed"])  # noqa: E731
    for r in sorted((r for r in rows if r["method"] != "fp"), key=key):
        seed = "-" if r["method"] == "rtn" else str(r["seed"])
        settings = "-" if r["method"] == "rtn" else f"{r['iters']}, {r['nsamples']} x {r['seqlen']}, {r['batch_size']}"
        fmt = lambda x: f"{x:.4g}" if x > 1000 else f"{x:.2f}"  # noqa: E731
        lines.append(
            f"| W{r['bits']} g{r['group_size']} asym | {LABELS[r['method']]} | {settings} | {seed} | {fmt(r['ppl']['austen-eval'])} | "
            f"{fmt(r['ppl']['kjv'])} | {r['quantize_seconds']:.0f} |"
        )
    return "\n".join(lines)


def summary(device: str = "cpu") -> str:
    """Mean over seeds and the seed-to-seed spread (max - min) per scheme, method and settings."""
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("accuracy-*.json"))]
    rows = [r for r in rows if isinstance(r, dict) and r.get("method") in LABELS and "ppl" in r and r.get("device", "cpu") == device]
    groups: dict[tuple, list] = {}
    for r in rows:
        settings = "-" if r["method"] == "rtn" else f"{r['iters']}, {r['nsamples']} x {r['seqlen']}, {r['batch_size']}"
        groups.setdefault((r["bits"], r["group_size"], settings, r["method"]), []).append(r)
    lines = [
        "| scheme | settings | method | seeds | austen-eval mean (spread) | kjv mean (spread) |",
        "|---|---|---|---|---|---|",
    ]
    order = {"rtn": 0, "ref": 1, "ours": 2}
    for (bits, gs, settings, method), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][2] != "-", kv[0][2], order[kv[0][3]])):
        cells = []
        for text in EVAL_TEXTS:
            v = [r["ppl"][text] for r in rs]
            mean = sum(v) / len(v)
            cells.append(f"{mean:.4g}" if mean > 1000 else f"{mean:.2f} ({max(v) - min(v):.2f})")
        seeds = "-" if method == "rtn" else ", ".join(str(r["seed"]) for r in rs)
        lines.append(f"| W{bits} g{gs} asym | {settings} | {LABELS[method]} | {seeds} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=("rtn", "ours", "ref", "fp"), default="ours")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--device", default="cpu", help="cpu or cuda (both quantize and evaluate there)")
    p.add_argument("--results", default=str(RESULTS), help="folder for the JSON result")
    p.add_argument("--table", action="store_true", help="print the table built from bench/results/accuracy-*.json (of --device)")
    p.add_argument("--summary", action="store_true", help="print means over seeds and their spread (of --device)")
    args = p.parse_args()
    if args.table or args.summary:
        print(table(args.device) if args.table else summary(args.device))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(args)


if __name__ == "__main__":
    main()
