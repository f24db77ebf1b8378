"""AutoRound speed on one GPU: lowbit vs the auto-round package, same checkpoint, same GPU, same text.

A random-weight Llama checkpoint with Llama-3-8B block shapes (hidden 4096, MLP 14336, 32 heads, 8 KV
heads; a few blocks; the SmolLM2 tokenizer and vocabulary) is written to disk, then each implementation
quantizes it at auto-round's defaults (W4A16 g128 sym, 200 iterations, 128 x 2048 samples, batch 8) in
its own process, so peak VRAM is per implementation. Time per block is measured around each block's
algorithm call (lowbit: the registered "autoround" function; auto-round: AlgorithmComposer.compress_block),
with CUDA synchronized on both sides; both include computing the block's fp targets.

    python bench/autoround_speed.py make --out /tmp/ck --tokenizer DIR [--layers 3]
    python bench/autoround_speed.py ours --ckpt /tmp/ck --text austen.txt --json out.json
    python bench/autoround_speed.py ref  --ckpt /tmp/ck --text austen.txt --json out.json
    python bench/autoround_speed.py table bench/results/autoround-speed-*.json
The `--tiny` flag shrinks the shapes and settings for a CPU smoke test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

LLAMA3_8B_BLOCK = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128)
TINY_BLOCK = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make(args) -> None:
    """Random-weight bf16 Llama checkpoint with `layers` blocks, plus the tokenizer files."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    shapes = TINY_BLOCK if args.tiny else LLAMA3_8B_BLOCK
    config = LlamaConfig(
        **shapes, num_hidden_layers=args.layers, vocab_size=len(tok), max_position_embeddings=8192,
        rope_theta=500000.0, tie_word_embeddings=False, architectures=["LlamaForCausalLM"], dtype="bfloat16",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # init on the GPU: seconds instead of a minute
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, {args.layers} blocks")


def settings(args) -> dict:
    if args.tiny:
        return dict(iters=4, nsamples=4, seqlen=128, batch_size=2)
    return dict(iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size)


def run_ours(args) -> dict:
    import lowbit
    from lowbit.algorithms import handler_for, register_algorithm

    s = settings(args)
    inner = handler_for(lowbit.AutoRoundConfig())
    times = []

    def timed(ctx, config):
        sync()
        t0 = time.perf_counter()
        out = inner(ctx, config)
        sync()
        times.append(time.perf_counter() - t0)
        return out

    register_algorithm(lowbit.AutoRoundConfig, timed)
    out_dir = Path(args.workdir) / "ours-out"
    shutil.rmtree(out_dir, ignore_errors=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    summary = lowbit.quantize(
        args.ckpt,
        lowbit.AutoRoundConfig(iters=s["iters"], compile=args.compile, low_gpu_mem=args.low_gpu_mem),
        lowbit.Scheme(bits=4, group_size=128, sym=True),
        calib=lowbit.CalibConfig(dataset=args.text, nsamples=s["nsamples"], seqlen=s["seqlen"], batch_size=s["batch_size"]),
        run=lowbit.RunConfig(output_dir=str(out_dir), device=device, overwrite=True),
        progress=False,
    )
    total = time.perf_counter() - t0
    return {
        "impl": "lowbit", "compile": args.compile if args.compile is not None else f"default ({torch.cuda.is_available()})", "low_gpu_mem": args.low_gpu_mem, "block_seconds": times, "total_seconds": total,
        "peak_vram_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
        "peak_rss_bytes": summary.peak_rss, "block_losses": [list(x) for x in summary.block_losses], **s,
    }


def run_ref(args) -> dict:
    import auto_round
    from auto_round import AutoRound
    from auto_round.algorithms.composer import AlgorithmComposer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.calib.corpora import load_text
    from lowbit.calib.samples import calibration_windows
    from lowbit.config import CalibConfig

    s = settings(args)
    tok = AutoTokenizer.from_pretrained(args.ckpt)
    windows = calibration_windows(tok, load_text(args.text), CalibConfig(nsamples=s["nsamples"], seqlen=s["seqlen"]))
    times = []
    inner = AlgorithmComposer.compress_block

    def timed(self, *a, **kw):
        sync()
        t0 = time.perf_counter()
        out = inner(self, *a, **kw)
        sync()
        times.append(time.perf_counter() - t0)
        return out

    AlgorithmComposer.compress_block = timed
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=torch.bfloat16)
    kwargs = {} if args.compile is None else {"enable_torch_compile": args.compile}
    ar = AutoRound(
        model, tok, bits=4, group_size=128, sym=True, iters=s["iters"], nsamples=s["nsamples"], seqlen=s["seqlen"],
        batch_size=s["batch_size"], dataset=[w.unsqueeze(0) for w in windows], low_gpu_mem_usage=args.low_gpu_mem, **kwargs,
    )
    ar.quantize()
    total = time.perf_counter() - t0
    return {
        "impl": f"auto-round {auto_round.__version__}", "compile": getattr(ar, "enable_torch_compile", args.compile),
        "low_gpu_mem": args.low_gpu_mem, "block_seconds": times, "total_seconds": total,
        "peak_vram_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0, **s,
    }


def table(paths: list[str]) -> str:
    lines = [
        "| implementation | GPU | torch.compile | first block (s) | later blocks, mean (s) | total (s) | peak VRAM (GB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in paths:
        r = json.loads(Path(p).read_text())
        later = r["block_seconds"][1:] or r["block_seconds"]
        lines.append(
            f"| {r['impl']} | {r.get('gpu', '-')} | {r['compile']} | {r['block_seconds'][0]:.1f} | {sum(later) / len(later):.1f} "
            f"| {r['total_seconds']:.0f} | {r['peak_vram_bytes'] / 1e9:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("make", "ours", "ref", "table"))
    p.add_argument("paths", nargs="*")
    p.add_argument("--out")
    p.add_argument("--tokenizer")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--ckpt")
    p.add_argument("--text", default="austen")
    p.add_argument("--json")
    p.add_argument("--workdir", default="/tmp/lowbit-speed")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: each implementation's own default (lowbit: on for CUDA)")
    p.add_argument("--low_gpu_mem", action="store_true")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    if args.what == "make":
        return make(args)
    if args.what == "table":
        return print(table(args.paths))
    if args.what == "ours":
        result = run_ours(args)
    else:
        result = run_ref(args)
    result["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result["torch"] = torch.__version__
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
