"""Scale check for mixture-of-experts: a random-weight checkpoint shaped like Qwen3-30B-A3B (hidden 2048,
128 experts of 768, top 8, 32 query / 4 KV heads of 128, vocab 151936), quantized with the lowbit CLI by RTN,
AutoRound (few iterations) and GPTQ on 128 x 2048 calibration tokens: peak RSS / VRAM and time per block, then
each expert's quantization error on the tokens routed to it (held-out text, not the calibration text),
GPTQ / AutoRound against RTN.

`--blocks` writes fewer of the 48 blocks at the real shapes (the single H200's disk; peak RAM depends on the
block, not the depth). The calibration text is a file (`--text`); its first 85% calibrates, the rest is the
held-out text of the error check.

    python bench/moe_scale.py --text .cache/austen.txt --blocks 4 --workdir /tmp/moe   [--tiny: CPU smoke test]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vlm_scale import ROOT, quantize, write_random_checkpoint, write_tokenizer  # noqa: E402


def qwen3_30b_a3b(blocks: int, tiny: bool = False):
    from transformers import Qwen3MoeConfig

    kw = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
              num_hidden_layers=blocks, num_attention_heads=32, num_key_value_heads=4, head_dim=128, tie_word_embeddings=False, norm_topk_prob=True)
    if tiny == "small":  # a CPU-sized study of the expert statistics: real head shapes, fewer / narrower experts
        kw.update(vocab_size=8192, hidden_size=1024, moe_intermediate_size=384, num_experts=32, num_experts_per_tok=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=128)
    elif tiny:
        kw.update(vocab_size=8192, hidden_size=256, moe_intermediate_size=128, num_experts=16, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    config = Qwen3MoeConfig(**kw)
    config.architectures = ["Qwen3MoeForCausalLM"]
    return config


MIN_HELD_OUT = 16  # an expert's MSE on fewer held-out tokens is noise (a 2-token sample decides it)


@torch.no_grad()
def expert_errors(ckpt: Path, outs: dict[str, Path], text: str, block: int, device: str, tokens: int) -> dict:
    """Per expert of `block`: mean squared error of its output on the held-out tokens routed to it, for each
    output folder, through lowbit.load (its dequantized experts) against the fp checkpoint's experts."""
    import lowbit
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(ckpt)(text, return_tensors="pt").input_ids[:, :tokens].to(device)
    fp = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, device_map=device).eval()
    seen = {}
    experts = fp.model.layers[block].mlp.experts
    handle = experts.register_forward_hook(lambda m, args, out: seen.update(x=args[0], top=args[1]))
    fp(ids[:, :tokens], use_cache=False)
    handle.remove()
    x, top = seen["x"], seen["top"]  # [T, H], [T, k]: block `block`'s expert inputs and routes, fp model
    ref = {}
    gu, dn = experts.gate_up_proj, experts.down_proj  # [E, 2I, H], [E, H, I]
    for e in range(gu.shape[0]):
        rows = (top == e).any(-1).nonzero().flatten()
        if len(rows):
            g, u = (x[rows] @ gu[e].t()).chunk(2, dim=-1)
            ref[e] = (rows, (torch.nn.functional.silu(g) * u) @ dn[e].t())
    del fp
    torch.cuda.empty_cache() if device.startswith("cuda") else None
    errors = {}
    for name, out in outs.items():
        model = lowbit.load(out, device_map=device, dtype=torch.bfloat16, fuse=False)
        mod = model.model.layers[block].mlp.experts
        err = {}
        for e, (rows, want) in ref.items():
            ex = getattr(mod, str(e))
            got = ex.down_proj(torch.nn.functional.silu(ex.gate_proj(x[rows])) * ex.up_proj(x[rows]))
            err[e] = float(((got.float() - want.float()) ** 2).mean())
        errors[name] = err
        del model
    return {"routed_experts": len(ref), "errors": errors, "held_out_tokens": {e: len(rows) for e, (rows, _) in ref.items()}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--text", required=True)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--workdir", default="/tmp/moe-scale")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--methods", default="rtn,autoround,gptq",
                   help="comma list; gptq@N: GPTQ with --moe_unrouted_tokens N (e.g. gptq@inf: every token alike)")
    p.add_argument("--error_block", type=int, default=1)
    p.add_argument("--error_tokens", type=int, default=4096)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--small", action="store_true", help="hidden 1024, 32 experts of 384, top 4: the expert-statistics study on a CPU")
    args = p.parse_args()
    work = Path(args.workdir)
    text = Path(args.text).read_text(encoding="utf-8")
    cut = int(len(text) * 0.85)
    calib_file, held_out = work / "calib.txt", text[cut:]
    ckpt = work / "qwen3moe"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    calib_file.write_text(text[:cut])
    t0 = time.time()
    nbytes = write_random_checkpoint(qwen3_30b_a3b(args.blocks, "small" if args.small else args.tiny), ckpt)
    write_tokenizer(ckpt, text)
    print(f"wrote {nbytes / 2**30:.1f} GiB in {time.time() - t0:.0f} s", flush=True)
    calib = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch_size", "8", "--dataset", str(calib_file)]
    extra = {"rtn": ["--method", "rtn"], "autoround": ["--method", "autoround", "--iters", str(args.iters), "--disable_torch_compile", *calib],
             "gptq": ["--method", "gptq", *calib]}
    rows, outs = {}, {}
    for method in args.methods.split(","):
        outs[method] = work / f"out-{method.replace('@', '-')}"
        base, _, unrouted = method.partition("@")
        rows[method] = quantize(ckpt, outs[method], extra[base] + (["--moe_unrouted_tokens", unrouted] if unrouted else []), args.device, keep=True)
        print(method, rows[method], flush=True)
    ok = {m: o for m, o in outs.items() if "error" not in rows[m]}
    errors = expert_errors(ckpt, ok, held_out, args.error_block, args.device, args.error_tokens) if "rtn" in ok else {}
    env = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    import transformers

    env["transformers"] = transformers.__version__
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"moe-scale-{time.strftime('%Y-%m-%d')}.json").write_text(json.dumps({"env": env, "args": vars(args), "rows": rows, "expert_errors": errors}, indent=2))
    print(f"\n{env}\nQwen3-30B-A3B shapes, {args.blocks} blocks, {nbytes / 2**30:.1f} GiB checkpoint")
    print(f"{'method':10} {'time s':>7} {'s/block':>8} {'RSS GiB':>8} {'VRAM GiB':>9} {'experts RTN':>12}")
    for method, r in rows.items():
        if "error" in r:
            print(f"{method:10} ERROR {r['error']}")
            continue
        print(f"{method:10} {r['seconds']:7.1f} {r['seconds'] / args.blocks:8.2f} {r['peak_rss_gib']:8.2f} {max(r['peak_vram_gib'].values() or [0]):9.2f} {r['experts_rtn']:12}")
    if errors:
        rtn = errors["errors"]["rtn"]
        print(f"\nper-expert MSE on held-out routed tokens, block {args.error_block} ({errors['routed_experts']} experts routed):")
        counts = errors["held_out_tokens"]
        for method, err in errors["errors"].items():
            ratios = sorted(err[e] / rtn[e] for e in err if rtn[e] > 0)
            no_worse = sum(r <= 1.0 for r in ratios)
            worse = ", ".join(f"expert {e}: {err[e] / rtn[e]:.2f}x on {counts[e]} tokens" for e in sorted(err, key=lambda e: -err[e] / max(rtn[e], 1e-30)) if rtn[e] > 0 and err[e] > rtn[e])
            enough = [e for e in err if rtn[e] > 0 and counts[e] >= MIN_HELD_OUT]
            print(f"  {method:10} median error / RTN {ratios[len(ratios) // 2]:.3f}  worst {ratios[-1]:.3f}  no worse than RTN: {no_worse}/{len(ratios)}"
                  f"; on the {len(enough)} experts with >= {MIN_HELD_OUT} held-out tokens: {sum(err[e] <= rtn[e] for e in enough)}/{len(enough)}"
                  + (f"  (worse: {worse})" if worse else ""))


if __name__ == "__main__":
    main()
