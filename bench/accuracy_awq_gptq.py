"""Accuracy of RTN, AWQ and GPTQ on SmolLM2-135M (ANCHORS protocol), on the CPU.

Each (method, bits) run quantizes the default model at W<bits> g128 asym, loads the export back with
lowbit.load and measures perplexity on "austen-eval" (Pride and Prejudice, 40 x 512) and "kjv" (out of
domain). Calibration: the first `nsamples` windows of `seqlen` tokens of "austen" (Emma + Mansfield
Park). Results go to bench/results/accuracy-awq-gptq-<method>-w<bits>g128.json; finished runs are
skipped, so an interrupted invocation resumes. The table is printed at the end (or with --table).

    nice python bench/accuracy_awq_gptq.py --methods rtn,gptq,awq --bits 4,3 --nsamples 64 --seqlen 512
    python bench/accuracy_awq_gptq.py --table
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
PREFIX = "accuracy-awq-gptq-"
EVAL_TEXTS = ("austen-eval", "kjv")
LABELS = {"rtn": "RTN", "awq": "lowbit AWQ", "gptq": "lowbit GPTQ", "gptq-act": "lowbit GPTQ act-order", "llmc-awq": "llm-compressor AWQ", "llmc-gptq": "llm-compressor GPTQ"}


def evaluate(model, tokenizer) -> dict[str, float]:
    from lowbit.calib.corpora import load_text
    from lowbit.eval.perplexity import perplexity

    return {name: perplexity(model, tokenizer, load_text(name)) for name in EVAL_TEXTS}


def method_config(name: str, args):
    import lowbit

    return {"rtn": lowbit.RtnConfig(), "awq": lowbit.AwqConfig(search_samples=args.awq_search_samples), "gptq": lowbit.GptqConfig(), "gptq-act": lowbit.GptqConfig(act_order=True)}[name]


def run_one(method: str, bits: int, args) -> dict:
    if method.startswith("llmc-"):
        return run_llmc(method, bits, args)
    import lowbit
    from transformers import AutoTokenizer

    scheme = lowbit.Scheme(bits=bits, group_size=args.group, sym=False)
    calib = lowbit.CalibConfig(dataset="austen", nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q"
        t0 = time.time()
        summary = lowbit.quantize("default", method_config(method, args), scheme, calib=calib, run=lowbit.RunConfig(output_dir=str(out), device=args.device), progress=args.progress)
        seconds = time.time() - t0
        if args.device == "cpu":
            model = lowbit.load(str(out))
        else:  # the export dequantized once into the fp32 model (accuracy.py), evaluated on the GPU
            from accuracy import dequantized_model

            model = dequantized_model(out).to(args.device)
        ppl = evaluate(model, AutoTokenizer.from_pretrained(out))
    return {"quantize_seconds": seconds, "ppl": ppl, "block_losses": [list(x) for x in summary.block_losses]}


def run_llmc(method: str, bits: int, args) -> dict:
    """llm-compressor's GPTQ (act-order "static", dampening 0.01, like lowbit's default) or AWQ (duo scaling,
    its default grid and clipping), on the same token windows, evaluated on the model oneshot leaves in memory
    (its quantized weights applied by compressed-tensors' forward)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.calib.corpora import load_text
    from lowbit.calib.samples import calibration_windows
    from lowbit.config import CalibConfig
    from lowbit.model import resolve_model

    path = resolve_model("default")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(args.device).eval()
    windows = calibration_windows(tokenizer, load_text("austen"), CalibConfig(nsamples=args.nsamples, seqlen=args.seqlen))
    dataset = Dataset.from_dict({"input_ids": [w.tolist() for w in windows], "attention_mask": [[1] * len(w) for w in windows]})
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=args.group)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if method == "llmc-gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=0.01, actorder="static")
    else:
        from llmcompressor.modifiers.awq import AWQModifier

        recipe = AWQModifier(config_groups=groups, ignore=["lm_head"], duo_scaling=True)
    t0 = time.time()
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=args.seqlen, num_calibration_samples=len(windows))
    seconds = time.time() - t0
    import llmcompressor

    return {"quantize_seconds": seconds, "ppl": evaluate(model.eval(), tokenizer), "llmcompressor_version": llmcompressor.__version__}


def table() -> str:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(PREFIX + "*.json"))]
    order = list(LABELS)
    lines = ["| scheme | method | calibration | device | austen-eval ppl | kjv ppl | quantize time (s) |", "|---|---|---|---|---|---|---|"]
    fmt = lambda x: f"{x:.4g}" if x > 1000 else f"{x:.2f}"  # noqa: E731
    for r in sorted(rows, key=lambda r: (r.get("device", "cpu"), -r["bits"], -r["group_size"], order.index(r["method"]))):
        cal = "-" if r["method"] == "rtn" else f"{r['nsamples']} x {r['seqlen']}"
        if r.get("awq_search_samples"):
            cal += f" (grid scored on {r['awq_search_samples']})"
        device = r.get("gpu") or "CPU"
        lines.append(f"| W{r['bits']} g{r['group_size']} asym | {LABELS[r['method']]} | {cal} | {device} | {fmt(r['ppl']['austen-eval'])} | {fmt(r['ppl']['kjv'])} | {r['quantize_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="rtn,gptq,awq")
    p.add_argument("--bits", default="4,3")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--awq_search_samples", type=int, default=None, help="windows scoring AWQ's scale grid (default all)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 avoids spin-waits on a loaded CPU)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--group", type=int, default=128, help="group size (64 divides SmolLM2's 576-wide inputs, which llm-compressor needs)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (quantize and evaluate there)")
    p.add_argument("--results", default=str(RESULTS), help="folder for the JSON results")
    p.add_argument("--table", action="store_true", help="only print the table from bench/results")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.table:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        results = Path(args.results)
        results.mkdir(parents=True, exist_ok=True)
        suffix = "" if args.device == "cpu" else f"-{args.device}"
        for bits in (int(b) for b in args.bits.split(",")):
            for method in args.methods.split(","):
                path = results / f"{PREFIX}{method}-w{bits}g{args.group}{suffix}.json"
                if path.exists():
                    continue
                out = run_one(method, bits, args)
                out.update(
                    method=method, bits=bits, group_size=args.group, sym=False, nsamples=args.nsamples, seqlen=args.seqlen, device=args.device,
                    gpu=torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
                    date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    awq_search_samples=args.awq_search_samples if method == "awq" else None,
                    batch_size=args.batch_size, torch=torch.__version__, threads=torch.get_num_threads(),
                    machine=f"{platform.machine()} {os.cpu_count()} cores",
                )
                path.write_text(json.dumps(out, indent=2))
                print(f"{path.name}: {json.dumps(out['ppl'])} in {out['quantize_seconds']:.0f}s", flush=True)
    print(table())


if __name__ == "__main__":
    main()
