"""End-to-end decode: tokens/s of a random-weight model with Llama-3-8B shapes, fp16 vs lowbit W4 g128,
through transformers `generate` with a static cache (which compiles the forward with CUDA graphs).

    PYTHONPATH=src python bench/decode.py [--layers 32] [--batches 1 8] [--new-tokens 128] [--vocab 128256] [--time-limit S]

The W4 model is the fp16 one with every linear of the blocks swapped for a QuantLinear holding random
codes (the kernels' speed does not depend on the values). lm_head stays fp16, as in lowbit's exports.
Writes bench/results/decode-<date>.json after every measurement; prints a table last.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, graph_replay_us, write_json  # noqa: E402

from lowbit.kernels.linear import QuantLinear  # noqa: E402


def build(layers: int, vocab: int = 128256):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=vocab, max_position_embeddings=2048, rope_theta=500000.0, tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).half().eval()
    return model


def quantize_random(model, group_size: int = 128) -> None:
    """Swap every nn.Linear inside the blocks for a W4 QuantLinear with random codes, zeros and scales."""
    for block in model.model.layers:
        for name, lin in list(block.named_modules()):
            if not isinstance(lin, torch.nn.Linear):
                continue
            q = QuantLinear(lin.in_features, lin.out_features, 4, group_size, device="cuda")
            q.qweight.random_(-(2**31), 2**31 - 1)
            q.qzeros.random_(-(2**31), 2**31 - 1)
            q.scales.uniform_(1e-4, 3e-4)  # small: activations stay finite through 32 random blocks
            q.post_load()
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, q)
            del lin


def quantize_lm_head_random(model, group_size: int = 128) -> None:
    """The lm_head as a W4 QuantLinear with random codes (the opt-in `quant_lm_head` of lowbit's runner): at
    batch 1 the fp16 lm_head (128256 x 4096, 1.05 GB) is read once per token."""
    lin = model.lm_head
    q = QuantLinear(lin.in_features, lin.out_features, 4, group_size, device="cuda")
    q.qweight.random_(-(2**31), 2**31 - 1)
    q.qzeros.random_(-(2**31), 2**31 - 1)
    q.scales.uniform_(1e-4, 3e-4)
    q.post_load()
    model.lm_head = q
    del lin


def tokens_per_s(model, batch: int, new_tokens: int) -> float:
    ids = torch.randint(0, 1000, (batch, 16), device="cuda")
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, cache_implementation="static", pad_token_id=0)
    for _ in range(2):  # compile + capture, then one warm run
        model.generate(ids, **kw)
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(ids, **kw)
    torch.cuda.synchronize()
    return batch * new_tokens / (time.perf_counter() - t)


BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def linears_us(model, batch: int, reps: int = 20) -> float:
    """Median microseconds of one decode step's block linears alone (every layer's seven, in order, each fed
    a fresh [batch, in_features] input), replayed from one CUDA graph: the kernel-side cost of a token with no
    attention, no host overhead and no compiler. Weights far exceed L2, so no flush is needed."""
    mods = [layer.get_submodule(n) for layer in model.model.layers for n in BLOCK_LINEARS]
    shared_x: dict[int, torch.Tensor] = {}  # fused members (kernels/fuse.py) read one input, as in the model
    xs = []
    for m in mods:
        key = id(getattr(m, "shared", m))
        if key not in shared_x:
            shared_x[key] = torch.randn(batch, m.in_features, device="cuda", dtype=torch.float16)
        xs.append(shared_x[key])

    def step():
        for m, x in zip(mods, xs):
            m(x)

    return graph_replay_us(step, reps)


def compile_report() -> dict:
    """Dynamo/inductor counters that tell whether generate's compiled step ran from CUDA graphs."""
    from torch._dynamo.utils import counters

    return {group: dict(c) for group, c in counters.items() if group in ("graph_break", "inductor", "stats") and c}


def profile_generate(model, batch: int, new_tokens: int = 16) -> str:
    """Host-side view of a few compiled decode steps: kernel launches from the host (no CUDA graph) vs
    graph launches. Returns the profiler's table of the top host events."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, 1000, (batch, 16), device="cuda")
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, cache_implementation="static", pad_token_id=0)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.generate(ids, **kw)
        torch.cuda.synchronize()
    events = prof.key_averages()
    launches = {e.key: e.count for e in events if "Launch" in e.key or "launch" in e.key}
    return f"launch events over {new_tokens} tokens: {launches}\n" + events.table(sort_by="self_cpu_time_total", row_limit=25)


class _TimeUp(Exception):
    pass


def _time_up(signum, frame):
    raise _TimeUp


def use_pick(variant: str) -> None:
    """DECODE_PICK=default: run the W4 kinds with the default (H100) kernel table instead of this GPU's, to
    compare the two in one device call (separate processes, since generate's compiled CUDA graphs are cached
    on the model). DECODE_PICK=3launch: K splits reduced by a zero-fill and a cast launch around each matmul,
    as before splitk.py (r11). (r7 and noswap, the variants of earlier rounds, went with the code they undid.)"""
    if variant not in ("default", "3launch"):
        return
    import dataclasses

    from lowbit.kernels.triton import matmul as mm
    from lowbit.kernels.triton import table

    current = mm.pick_config

    def pick(m, n, k, bits, group_size, sm_count=132, table_=None, device_name=None):
        if variant == "default":
            return current(m, n, k, bits, group_size, sm_count, table.default_table())
        cfg = current(m, n, k, bits, group_size, sm_count, table_, device_name)
        return dataclasses.replace(cfg, in_kernel_reduce=False) if isinstance(cfg, mm.Config) else cfg

    mm.pick_config = pick


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=128256, help="smaller: the fp16 lm_head weighs less beside few layers")
    ap.add_argument("--time-limit", type=int, default=0, help="seconds; stop there, keep what was measured")
    ap.add_argument("--profile", action="store_true", help="print compile counters and a host profile of W4 decode")
    ap.add_argument("--skip-generate", action="store_true", help="only the linears-only CUDA-graph timing")
    ap.add_argument("--fuse", action="store_true", help="also time W4 with q/k/v and gate/up fused (kernels/fuse.py)")
    ap.add_argument("--kinds", nargs="+", choices=("fp16", "w4", "w4fused", "w4fused_qlm"), help="which models, in order (default fp16 w4 [w4fused]); w4fused_qlm: also a W4 lm_head")
    args = ap.parse_args()
    use_pick(os.environ.get("DECODE_PICK", ""))
    if args.time_limit:
        signal.signal(signal.SIGALRM, _time_up)
        signal.alarm(args.time_limit)
    torch.manual_seed(0)
    env = environment()
    results = {"env": env, "layers": args.layers, "vocab": args.vocab, "new_tokens": args.new_tokens, "tokens_per_s": {}, "seconds": {},
               "command": "PYTHONPATH=src python3 bench/decode.py " + " ".join(sys.argv[1:])}
    t0 = time.perf_counter()
    try:
        model = build(args.layers, args.vocab)
        fused = False
        kinds = args.kinds or (("fp16", "w4", "w4fused") if args.fuse else ("fp16", "w4"))
        for kind in kinds:
            if kind.startswith("w4") and not isinstance(model.model.layers[0].mlp.down_proj, QuantLinear):
                quantize_random(model)
                torch.cuda.empty_cache()
            if "fused" in kind and not fused:
                from lowbit.arch import spec_for
                from lowbit.kernels.fuse import fuse_shared_inputs

                fuse_shared_inputs(model, spec_for(model.config))
                fused = True
                torch.cuda.empty_cache()
            if kind.endswith("qlm") and not isinstance(model.lm_head, QuantLinear):
                quantize_lm_head_random(model)
                torch.cuda.empty_cache()
            for b in args.batches:
                results.setdefault("linears_us", {})[f"{kind}_b{b}"] = us = linears_us(model, b)
                write_json("decode", results)
                print(kind, b, f"block linears of one step, CUDA graph: {us:.0f} us", flush=True)
            if args.skip_generate:
                continue
            for b in args.batches:
                t1 = time.perf_counter()
                tps = tokens_per_s(model, b, args.new_tokens)
                results["tokens_per_s"][f"{kind}_b{b}"] = tps
                results["seconds"][f"{kind}_b{b}"] = time.perf_counter() - t1  # compile + capture + 2 runs
                write_json("decode", results)
                print(kind, b, f"{tps:.1f} tokens/s", flush=True)
                if args.profile:
                    print(kind, b, "compile counters:", compile_report(), flush=True)
            if args.profile and kind.startswith("w4"):
                print(profile_generate(model, args.batches[0]), flush=True)
    except _TimeUp:
        results["stopped_at_s"] = time.perf_counter() - t0
        write_json("decode", results)
        print(f"time limit ({args.time_limit} s) reached; kept {list(results['tokens_per_s'])}", flush=True)
    signal.alarm(0)
    print(f"\nDecode, Llama-3-8B shapes ({args.layers} layers), static cache + compile, {env['gpus'][0]}, {env['date']}")
    print(f"{'W4 kind':>8} {'batch':>5} {'fp16 tok/s':>11} {'W4 tok/s':>9} {'speedup':>8} {'fp16 linears us':>16} {'W4 linears us':>14} {'speedup':>8}")
    tp, lu = results["tokens_per_s"], results.get("linears_us", {})
    for kind in ("w4", "w4fused", "w4fused_qlm"):
        for b in args.batches:
            f, w = tp.get(f"fp16_b{b}"), tp.get(f"{kind}_b{b}")
            lf, lw = lu.get(f"fp16_b{b}"), lu.get(f"{kind}_b{b}")
            if not (w or lw):
                continue
            gen = f"{f:11.1f} {w:9.1f} {w / f:8.2f}" if f and w else f"{'-':>11} {'-':>9} {'-':>8}"
            lin = f"{lf:16.0f} {lw:14.0f} {lf / lw:8.2f}" if lf and lw else ""
            print(f"{kind:>8} {b:>5} {gen} {lin}")


if __name__ == "__main__":
    main()
