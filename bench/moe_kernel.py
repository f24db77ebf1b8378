"""The grouped MoE kernel on Qwen3-30B-A3B expert shapes (hidden 2048, moe_intermediate 768, 128 experts, top-8),
W4 g128 sym, one MoE layer's experts side by side at several token counts:

- grouped W4: `GroupedExperts` (kernels/moe.py), one launch per projection for all experts, from a CUDA graph
  (as in generate's compiled decode), and eager; the default launch (K split at decode sizes, by the device's
  kernel table rule "moe_split") beside the single-pass kernel (split_k = 1, the kernel before the K split);
- loop W4: the same experts as separate QuantLinears through lowbit's per-expert loop (eager: it syncs);
- bf16 grouped_mm / batched_mm: transformers' own experts implementations with the dequantized weights in
  bf16 (the fp model), from a CUDA graph; batched_mm gathers one weight copy per pair, so only small batches.

Correctness first: every implementation's output against the loop's (same weights), relative L2 error, and
the grouped paths also against transformers' eager experts loop on the dequantized weights in fp32.
Timing: lowbit's Timer (CUDA events, median, 256 MiB written before each call to flush L2).
--sweep also times grouped-kernel launch configs per projection; --generate measures tokens/s of a random-weight
Qwen3-MoE model (few layers, real widths) through transformers generate (static cache, compiled), W4 vs bf16.

    PYTHONPATH=src python bench/moe_kernel.py [--tokens 1 2 4 8 64 2048] [--sweep] [--generate] [--layers 4] [--time-limit S]
    TRITON_INTERPRET=1 PYTHONPATH=src python bench/moe_kernel.py --device cpu --tokens 1 2 --hidden 512 --inter 64 --experts 8 --top-k 2
        (CPU smoke test: the correctness checks only)

Writes bench/results/moe-kernel[-<tag>]-<date>.json (and $OUT) after each measurement (not in the CPU smoke
test); prints the tables last.
"""

from __future__ import annotations

import argparse
import copy
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timer, environment  # noqa: E402
from common import write_json as _write_json  # noqa: E402
from decode import tokens_per_s  # noqa: E402 - the same generate timing as the dense decode bench

from lowbit.arch.experts import experts_forward, unfuse_experts  # noqa: E402
from lowbit.kernels.linear import QuantLinear  # noqa: E402
from lowbit.kernels.moe import GroupedExperts  # noqa: E402
from lowbit.kernels.triton import moe as tmoe  # noqa: E402

SYM_ZEROS = -2004318072  # int32 0x88888888: eight 4-bit zero points of 8 (W4 sym)


def qwen3_moe_config(layers: int = 1, vocab: int = 151936, hidden: int = 2048, inter: int = 768, experts: int = 128, top_k: int = 8):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts, num_experts_per_tok=top_k, num_hidden_layers=layers,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144, vocab_size=vocab,
                          max_position_embeddings=4096, norm_topk_prob=True, tie_word_embeddings=False, architectures=["Qwen3MoeForCausalLM"])


def random_quantlinear(in_features: int, out_features: int, group: int, gen: torch.Generator) -> QuantLinear:
    """W4 sym QuantLinear with random codes, zero 8 and scales near 1 / (4.6 sqrt(K)): outputs of unit scale."""
    q = QuantLinear(in_features, out_features, 4, group, device=gen.device)
    q.qweight.random_(-(2**31), 2**31 - 1, generator=gen)
    q.qzeros.fill_(SYM_ZEROS)
    q.scales.uniform_(0.5, 1.5, generator=gen).mul_(1 / (4.6 * in_features**0.5))
    q.post_load()
    return q


def quantize_experts_random(model: torch.nn.Module, group: int, seed: int = 0, device: str = "cuda") -> list:
    """Unfuse every experts module (lowbit's skeleton step) and give each expert random W4 QuantLinears; then
    stack them for the grouped kernel. Returns the experts modules."""
    gen = torch.Generator(device=device).manual_seed(seed)
    unfuse_experts(model)
    modules = [m for m in model.modules() if getattr(m, "lowbit_layout", None) is not None]
    for module in modules:
        for i in range(module.lowbit_layout.num_experts):
            expert = getattr(module, str(i))
            for name, lin in list(expert.named_children()):
                setattr(expert, name, random_quantlinear(lin.in_features, lin.out_features, group, gen))
        module.lowbit_grouped = GroupedExperts(module)
    torch.cuda.empty_cache()
    return modules


def dequantized_into(fp_experts: torch.nn.Module, q_experts: torch.nn.Module) -> None:
    """fp_experts' fused parameters [E, 2I, H] / [E, H, I] := the W4 experts' dequantized weights."""
    layout = q_experts.lowbit_layout
    with torch.no_grad():
        for i in range(layout.num_experts):
            ex = getattr(q_experts, str(i))
            gate_up = torch.cat([getattr(ex, n).dequantize_weight() for n in layout.names[layout.first]])
            fp_experts.gate_up_proj[i].copy_(gate_up)
            fp_experts.down_proj[i].copy_(getattr(ex, layout.down).dequantize_weight())


def routing(tokens: int, experts: int, top_k: int, dtype, seed: int, device: str = "cuda"):
    """Qwen3-MoE's router on random logits: softmax, top-k, renormalised."""
    gen = torch.Generator(device=device).manual_seed(seed)
    probs = torch.randn(tokens, experts, device=device, generator=gen).softmax(-1)
    w, idx = probs.topk(top_k, dim=-1)
    return idx, (w / w.sum(-1, keepdim=True)).to(dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def layer_bench(args, results: dict) -> None:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    dtype, dev = getattr(torch, args.dtype), args.device
    config = qwen3_moe_config(hidden=args.hidden, inter=args.inter, experts=args.experts, top_k=args.top_k)
    with torch.device(dev):
        fp = Qwen3MoeExperts(copy.deepcopy(config)).to(dtype).eval()
        holder = torch.nn.Module()
        holder.experts = Qwen3MoeExperts(copy.deepcopy(config)).to(dtype)
    (q,) = quantize_experts_random(holder, args.group, device=dev)
    dequantized_into(fp, q)
    fp32 = copy.deepcopy(fp).float()  # the independent reference: transformers' eager loop, fp32, same weights
    fp32.config._experts_implementation = "eager"
    timing = dev == "cuda" and not args.check_only
    if timing:
        torch.cuda.empty_cache()
    timer = Timer() if timing else None
    table = results.setdefault("layer", {})
    swept = []
    for tokens in args.tokens:
        x = torch.randn(tokens, config.hidden_size, device=dev, generator=torch.Generator(device=dev).manual_seed(tokens)).to(dtype)
        idx, w = routing(tokens, config.num_experts, config.num_experts_per_tok, dtype, seed=tokens, device=dev)

        def grouped():  # the default launch: K split at decode sizes (the device's table rule)
            return experts_forward(q, x, idx, w)

        def single_pass():  # the kernel before the K split: each program walks all of K
            q.lowbit_grouped.split_k = 1
            try:
                return experts_forward(q, x, idx, w)
            finally:
                q.lowbit_grouped.split_k = 0

        def loop():
            q.lowbit_grouped, g = None, q.lowbit_grouped
            try:
                return experts_forward(q, x, idx, w)
            finally:
                q.lowbit_grouped = g

        def fp_impl(name):
            def run():
                fp.config._experts_implementation = name
                return fp(x, idx, w)
            return run

        pairs = tokens * config.num_experts_per_tok
        row = {"pairs": pairs, "block_m": tmoe.block_m_for(pairs, config.num_experts), **splits(q, pairs, torch.device(dev))}
        with torch.no_grad():
            ref = loop()
            ref32 = fp32(x.float(), idx, w.float())
            out, out1 = grouped(), single_pass()
            row["err_grouped_vs_loop"] = rel(out, ref)
            row["err_single_pass_vs_loop"] = rel(out1, ref)
            row["err_grouped_vs_fp32"] = rel(out, ref32)
            row["err_single_pass_vs_fp32"] = rel(out1, ref32)
            row["err_grouped_mm_vs_loop"] = rel(fp_impl("grouped_mm")(), ref)
            gathered = tokens * config.num_experts_per_tok * 3 * config.hidden_size * config.moe_intermediate_size * 2  # bytes
            if gathered < 8 * 2**30:
                row["err_batched_mm_vs_loop"] = rel(fp_impl("batched_mm")(), ref)
            print(f"T={tokens}: K splits (gate/up, down) {row['split_first']}/{row['split_down']}; rel. error vs loop: grouped "
                  f"{row['err_grouped_vs_loop']:.2e}, single-pass {row['err_single_pass_vs_loop']:.2e}, bf16 grouped_mm "
                  f"{row['err_grouped_mm_vs_loop']:.2e}; vs fp32 eager: grouped {row['err_grouped_vs_fp32']:.2e}, single-pass "
                  f"{row['err_single_pass_vs_fp32']:.2e}", flush=True)
            for key in ("err_grouped_vs_loop", "err_single_pass_vs_loop", "err_grouped_vs_fp32", "err_single_pass_vs_fp32"):
                assert row[key] < 2e-2, (key, row)
        if not timing:
            table[str(tokens)] = row
            continue
        with torch.no_grad():
            row["grouped_graph_us"] = timer(grouped)
            row["single_pass_graph_us"] = timer(single_pass)
            row["grouped_eager_us"] = timer(grouped, graph=False)
            row["loop_eager_us"] = timer(loop, graph=False)
            row["grouped_mm_graph_us"] = timer(fp_impl("grouped_mm"))
            if gathered < 8 * 2**30:
                row["batched_mm_graph_us"] = timer(fp_impl("batched_mm"))
        table[str(tokens)] = row
        save(results)
        print(f"T={tokens}: {row}", flush=True)
        swept.append((x, idx, w, tokens))
    for x, idx, w, tokens in swept if args.sweep else ():  # after the table: what matters most comes back first
        sweep(q, x, idx, w, tokens, timer, results)


def splits(q, pairs: int, device: torch.device) -> dict:
    """The K splits the default launch takes for gate/up and down at this many pairs (shapes only)."""
    grouped: GroupedExperts = q.lowbit_grouped
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    block_m = tmoe.block_m_for(pairs, grouped.num_experts)
    out = {}
    for proj in ("first", "down"):
        _, parts, n_part, k = grouped.stacked(q, proj).shape
        out[f"split_{proj}"] = tmoe.pick(block_m, parts, n_part, pairs, grouped.num_experts, sms, k=k,
                                         split_rule=tmoe.split_rule(device)).split_k
    return out


def candidates(block_m: int):
    """Launch configs around the default for one block size (few: each is a Triton compile on the lent GPU)."""
    if block_m <= 32:
        return [tmoe.MoeConfig(block_m, bn, 128, unpack4=u4) for bn in (32, 64, 128) for u4 in (True, False)]
    if block_m == 64:
        return [tmoe.MoeConfig(64, bn, 128, num_warps=4, num_stages=2, unpack4=False) for bn in (32, 64, 128)]
    return [tmoe.MoeConfig(block_m, bn, 128, num_warps=8, num_stages=2, unpack4=False) for bn in (64, 128)]


def sweep(q, x, idx, w, tokens: int, timer: Timer, results: dict) -> None:
    """Each projection alone through grouped_matmul, per launch config; the default pick's time beside the best."""
    grouped: GroupedExperts = q.lowbit_grouped
    first, down = grouped.stacked(q, "first"), grouped.stacked(q, "down")
    pairs = idx.numel()
    default_bm = tmoe.block_m_for(pairs, grouped.num_experts)
    sizes = (16,) if tokens <= 64 else (64, 128)
    out = results.setdefault("sweep", {}).setdefault(str(tokens), {})
    h = torch.randn(pairs, first.qweight.shape[-1], device="cuda", dtype=x.dtype)
    for bm in sorted(set(sizes) | {default_bm}):
        s, b = tmoe.align(idx, grouped.num_experts, bm)
        for proj, (w_, inp, top_k, weights) in {"first": (first, x, idx.shape[1], None), "down": (down, h, 1, w.reshape(-1))}.items():
            n_part = w_.shape[2]
            k = w_.shape[3]
            default = tmoe.pick(bm, w_.shape[1], n_part, pairs, grouped.num_experts, torch.cuda.get_device_properties(0).multi_processor_count,
                                k=k, split_rule=tmoe.split_rule(inp.device))
            # decode sizes: K splits (the data for the table's "moe_split" rule) at the narrower column tiles
            split_cfgs = [tmoe.MoeConfig(bm, bn, 128, split_k=sk) for bn in (16, 32, 64) for sk in (1, 2, 4, 8, 16)] if tokens <= 8 else []
            for cfg in candidates(bm) + split_cfgs + ([default] if bm == default_bm else []):
                if n_part % cfg.block_n:
                    continue
                key = (f"{proj} bm{cfg.block_m} bn{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages} u4{int(cfg.unpack4)} k{cfg.split_k}"
                       + (" (default)" if cfg == default and bm == default_bm else ""))
                try:
                    out[key] = timer(lambda: tmoe.grouped_matmul(inp, s, b, w_, top_k, bm, weights=weights, config=cfg))
                except Exception as exc:  # noqa: BLE001 - a config the GPU cannot run (shared memory): say so, go on
                    out[key] = f"failed: {type(exc).__name__}"
        save(results)
    for proj in ("first", "down"):
        timed = {k: v for k, v in out.items() if k.startswith(proj) and isinstance(v, float)}
        best = min(timed, key=timed.get)
        dflt = next((k for k in timed if k.endswith("(default)")), None)
        print(f"sweep T={tokens} {proj}: best {best} {timed[best]:.1f} us; default {dflt} {timed.get(dflt, float('nan')):.1f} us", flush=True)


# ---------------------------------------------------------------- end to end: transformers generate


def quantize_attention_random(model, group: int, seed: int = 1) -> None:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(layer.self_attn, name)
            setattr(layer.self_attn, name, random_quantlinear(lin.in_features, lin.out_features, group, gen))


def generate_bench(args, results: dict) -> None:
    from torch._dynamo.utils import counters
    from transformers import Qwen3MoeForCausalLM

    from lowbit.arch import spec_for
    from lowbit.kernels.fuse import fuse_shared_inputs

    dtype = getattr(torch, args.dtype)
    config = qwen3_moe_config(args.layers)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3MoeForCausalLM(config).to(dtype).eval()
    model.set_experts_implementation("grouped_mm")
    out = results.setdefault("generate", {"layers": args.layers, "new_tokens": args.new_tokens})
    for kind in ("bf16_grouped_mm", "w4_grouped"):
        if kind.startswith("w4"):
            quantize_attention_random(model, args.group)
            quantize_experts_random(model, args.group)  # also routes the experts to "lowbit"
            fuse_shared_inputs(model, spec_for(model.config))
            torch.cuda.empty_cache()
        for batch in args.batches:
            torch._dynamo.reset()
            counters.clear()
            out[f"{kind}_b{batch}"] = tps = tokens_per_s(model, batch, args.new_tokens)
            out[f"{kind}_b{batch}_graph_breaks"] = sum(counters["graph_break"].values())
            save(results)
            print(f"generate {kind} batch {batch}: {tps:.1f} tokens/s, graph breaks {out[f'{kind}_b{batch}_graph_breaks']}", flush=True)


# ---------------------------------------------------------------- main


def save(results: dict) -> None:
    """bench/results/moe-kernel[-tag]-<date>.json (and $OUT); nothing from the CPU smoke test, which would
    overwrite a GPU run's file of the same day."""
    if results["device"] == "cuda":
        _write_json("moe-kernel" + (f"-{results['tag']}" if results["tag"] else ""), results)


class _TimeUp(Exception):
    pass


def _time_up(signum, frame):
    raise _TimeUp


def print_tables(results: dict) -> None:
    layer = results.get("layer", {})
    if layer:
        shape = results.get("shape", {})
        print(f"\nOne MoE layer's experts (H {shape.get('hidden')}, I {shape.get('inter')}, {shape.get('experts')} experts, top-{shape.get('top_k')}), "
              f"W4 g{results['group']} sym, {results['dtype']}, median us; in brackets each time over the grouped W4 default's "
              "(the decode path: K split by the table's rule; single-pass: split_k = 1, the kernel before it):")
        print("| tokens | pairs | K splits gate-up/down | grouped W4 (graph) | single-pass W4 (graph) | bf16 grouped_mm (graph) | grouped W4 eager "
              "| loop W4 eager | bf16 batched_mm (graph) | err vs fp32: grouped / single-pass | err vs loop |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for t, r in layer.items():
            g = r.get("grouped_graph_us")
            cell = lambda key: (f"{r[key]:.1f} ({r[key] / g:.2f}x)" if g else f"{r[key]:.1f}") if key in r else "n/a"  # noqa: E731
            print(f"| {t} | {r['pairs']} | {r['split_first']}/{r['split_down']} | {f'{g:.1f}' if g else 'n/a'} | {cell('single_pass_graph_us')} | "
                  f"{cell('grouped_mm_graph_us')} | {cell('grouped_eager_us')} | {cell('loop_eager_us')} | {cell('batched_mm_graph_us')} | "
                  f"{r['err_grouped_vs_fp32']:.1e} / {r['err_single_pass_vs_fp32']:.1e} | {r['err_grouped_vs_loop']:.1e} |")
    gen = results.get("generate", {})
    if any(isinstance(v, float) for v in gen.values()):
        print(f"\ngenerate, random-weight Qwen3-MoE with {gen['layers']} layers (real widths), static cache + compile, {gen['new_tokens']} new tokens:")
        for k, v in gen.items():
            if isinstance(v, float):
                print(f"  {k}: {v:.1f} tokens/s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 64, 2048])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--sweep", action="store_true", help="also time grouped-kernel launch configs per projection")
    ap.add_argument("--generate", action="store_true", help="also tokens/s through transformers generate")
    ap.add_argument("--skip-layer", action="store_true", help="only --generate")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the checks under TRITON_INTERPRET=1 (no timing)")
    ap.add_argument("--check-only", action="store_true", help="correctness only, no timing")
    ap.add_argument("--time-limit", type=int, default=0, help="seconds; stop there, keep what was measured")
    ap.add_argument("--tag", default="", help="results file bench/results/moe-kernel-<tag>-<date>.json")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/moe_kernel.py times on a CUDA GPU and found none; for the correctness checks alone on the CPU: "
                 "TRITON_INTERPRET=1 ... --device cpu --tokens 1 2 --hidden 512 --inter 64 --experts 8 --top-k 2")
    if args.time_limit:
        signal.signal(signal.SIGALRM, _time_up)
        signal.alarm(args.time_limit)
    results = {"env": environment() if args.device == "cuda" else {}, "dtype": args.dtype, "group": args.group,
               "shape": {"hidden": args.hidden, "inter": args.inter, "experts": args.experts, "top_k": args.top_k},
               "device": args.device, "tag": args.tag,
               "command": "PYTHONPATH=src python3 bench/moe_kernel.py " + " ".join(sys.argv[1:])}
    t0 = time.perf_counter()
    try:
        if not args.skip_layer:
            layer_bench(args, results)
        if args.generate:
            generate_bench(args, results)
    except _TimeUp:
        print(f"time limit reached after {time.perf_counter() - t0:.0f} s; keeping what was measured")
        results["stopped"] = "time limit"
    results["seconds"] = time.perf_counter() - t0
    save(results)
    print_tables(results)


if __name__ == "__main__":
    main()
