"""End-to-end decode: tokens/s of a random-weight model with Llama-3-8B shapes, fp16 vs lowbit W4 g128,
through transformers `generate` with a static cache (which compiles the forward with CUDA graphs).

    PYTHONPATH=src python bench/decode.py [--layers 32] [--batches 1 8] [--new-tokens 128] [--vocab 128256] [--time-limit S]
        [--kinds fp16 w4fused w4head] [--profile] [--tiny]

The W4 model is the fp16 one with every linear of the blocks swapped for a QuantLinear holding random
codes (the kernels' speed does not depend on the values). lm_head stays fp16, as in lowbit's exports, except in
`w4head`: the fp16 head RTN-quantized W4 g128 by the code `lowbit.load(..., quant_lm_head=True)` runs.
--profile adds, per (kind, batch), a device-side breakdown of a decode step (decode_profile.py: µs by kernel
category, GPU busy vs wall, launches and syncs per token) and the lm_head alone from a CUDA graph.
--tiny: a 2-block model of small width on the CPU (no compile, no CUDA graphs): runs every code path of
the script, profile included, as a smoke test.
Writes bench/results/decode-<date>.json after every measurement; prints tables last.
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

from lowbit.arch import spec_for  # noqa: E402
from lowbit.config import Scheme  # noqa: E402
from lowbit.kernels.fuse import FusedSlice, fuse_shared_inputs  # noqa: E402
from lowbit.kernels.linear import QuantLinear  # noqa: E402


LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)  # --tiny, on the CPU


def build(layers: int, vocab: int = 128256, device: str = "cuda", shapes: dict = LLAMA3_8B):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **shapes, num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=2048, rope_theta=500000.0, tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.float16 if device == "cuda" else torch.float32).eval()
    return model


def quantize_random(model, group_size: int = 128) -> None:
    """Swap every nn.Linear inside the blocks for a W4 QuantLinear with random codes, zeros and scales."""
    device = model.device
    for block in model.model.layers:
        for name, lin in list(block.named_modules()):
            if not isinstance(lin, torch.nn.Linear):
                continue
            q = QuantLinear(lin.in_features, lin.out_features, 4, group_size, dtype=lin.weight.dtype, device=device)
            q.qweight.random_(-(2**31), 2**31 - 1)
            q.qzeros.random_(-(2**31), 2**31 - 1)
            q.scales.uniform_(1e-4, 3e-4)  # small: activations stay finite through 32 random blocks
            q.post_load()
            q.cache_dequantized = device.type == "cpu"  # --tiny: as lowbit.load does for CPU layers
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, q)
            del lin


def quantize_head(model) -> None:
    """The fp16 lm_head RTN-quantized W4 g128 in place, by lowbit.load's `quant_lm_head=True` code: at batch 1
    the fp16 head (128256 x 4096, 1.05 GB) is read once per token, 0.27 GB at W4."""
    from lowbit.loading import quantize_head as quantize

    quantize(model, "lm_head", Scheme())
    model.lm_head.post_load()
    model.lm_head.cache_dequantized = model.device.type == "cpu"


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def generate_kw(new_tokens: int) -> dict:
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, cache_implementation="static", pad_token_id=0)


def prompt(model, batch: int) -> torch.Tensor:
    return torch.randint(0, min(1000, model.config.vocab_size), (batch, 16), device=model.device, generator=torch.Generator(model.device).manual_seed(batch))


def tokens_per_s(model, batch: int, new_tokens: int) -> float:
    ids, kw = prompt(model, batch), generate_kw(new_tokens)
    for _ in range(2):  # compile + capture, then one warm run
        model.generate(ids, **kw)
    _sync(model.device)
    t = time.perf_counter()
    model.generate(ids, **kw)
    _sync(model.device)
    return batch * new_tokens / (time.perf_counter() - t)


def decode_breakdown(model, batch: int, new_tokens: int, short: int, long: int) -> dict:
    """decode_profile.breakdown of generate at `batch` (warm: after tokens_per_s). Each call keeps
    max_new_tokens = new_tokens, as the warm-up had (another value resizes the static cache, and the compiled
    step recompiles), and stops after n tokens through a stopping criterion that returns one of two tensors
    made here (no launch of its own; StoppingCriteriaList ORs it in: one small aten kernel per step)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import StoppingCriteria, StoppingCriteriaList

    from decode_profile import breakdown

    ids, kw = prompt(model, batch), generate_kw(new_tokens)
    on_cuda = model.device.type == "cuda"
    done = {v: torch.full((batch,), v, dtype=torch.bool, device=model.device) for v in (False, True)}

    class StopAfter(StoppingCriteria):
        def __init__(self, n: int):
            self.stop_len = ids.shape[1] + n

        def __call__(self, input_ids, scores, **kwargs):
            return done[input_ids.shape[1] >= self.stop_len]

    def run(n: int) -> None:
        model.generate(ids, **{**kw, "min_new_tokens": n}, stopping_criteria=StoppingCriteriaList([StopAfter(n)]))

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    return breakdown(run, short, min(long, new_tokens), lambda: profile(activities=activities), on_cuda, sync=lambda: _sync(model.device))


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


def head_us(model, batch: int) -> float:
    """Median µs of the lm_head alone on a [batch, hidden] input, from a CUDA graph."""
    x = torch.randn(batch, model.config.hidden_size, device="cuda", dtype=torch.float16)
    return graph_replay_us(lambda: model.lm_head(x))


def compile_report() -> dict:
    """Dynamo/inductor counters that tell whether generate's compiled step ran from CUDA graphs."""
    from torch._dynamo.utils import counters

    return {group: dict(c) for group, c in counters.items() if group in ("graph_break", "inductor", "stats") and c}


class _TimeUp(Exception):
    pass


def _time_up(signum, frame):
    raise _TimeUp


def _timed_out(exc: BaseException) -> bool:
    """Whether `exc` is the time limit's _TimeUp, possibly re-raised inside torch.compile (InductorError
    keeps it as `inner_exception`, and dynamo re-raises `from None`, which leaves __context__)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, _TimeUp):
            return True
        seen.add(id(exc))
        exc = getattr(exc, "inner_exception", None) or exc.__cause__ or exc.__context__
    return False


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


KINDS = ("fp16", "w4", "w4fused", "w4head")  # in an order each one's model is the previous one changed in place


def prepare(model, kind: str) -> None:
    """Turn the model into `kind`'s: W4 block linears (random codes), q/k/v and gate/up fused, the head W4."""
    if kind.startswith("w4") and not isinstance(model.model.layers[0].mlp.down_proj, QuantLinear):
        quantize_random(model)
    if kind in ("w4fused", "w4head") and not isinstance(model.model.layers[0].self_attn.q_proj, FusedSlice):
        fuse_shared_inputs(model, spec_for(model.config))
    if kind == "w4head" and not isinstance(model.lm_head, QuantLinear):
        quantize_head(model)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=128256, help="smaller: the fp16 lm_head weighs less beside few layers")
    ap.add_argument("--time-limit", type=int, default=0, help="seconds; stop there, keep what was measured")
    ap.add_argument("--profile", action="store_true", help="device-side breakdown per decode token (decode_profile.py) and compile counters")
    ap.add_argument("--profile-tokens", type=int, nargs=2, default=[8, 40], metavar=("SHORT", "LONG"),
                    help="new tokens of the two profiled generate calls whose difference is the steady state (LONG <= --new-tokens)")
    ap.add_argument("--skip-generate", action="store_true", help="only the linears-only CUDA-graph timing")
    ap.add_argument("--fuse", action="store_true", help="also time W4 with q/k/v and gate/up fused (kernels/fuse.py)")
    ap.add_argument("--kinds", nargs="+", choices=KINDS,
                    help="which models, in this order (default fp16 w4 [w4fused]); w4head: w4fused with the lm_head RTN W4 g128 at load")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: 2 small blocks, vocab 512, no CUDA timing")
    args = ap.parse_args()
    if args.tiny:
        args.layers, args.vocab = 2, 512
    use_pick(os.environ.get("DECODE_PICK", ""))
    if args.time_limit:
        signal.signal(signal.SIGALRM, _time_up)
        signal.alarm(args.time_limit)
    torch.manual_seed(0)
    env = environment()
    results = {"env": env, "layers": args.layers, "vocab": args.vocab, "new_tokens": args.new_tokens, "tokens_per_s": {}, "seconds": {},
               "command": "PYTHONPATH=src python3 bench/decode.py " + " ".join(sys.argv[1:])}
    kinds = args.kinds or (("fp16", "w4", "w4fused") if args.fuse else ("fp16", "w4"))
    if list(kinds) != sorted(kinds, key=KINDS.index):
        sys.exit(f"--kinds must come in the order {' '.join(KINDS)} (each model is the previous one changed in place)")
    name = "decode-tiny" if args.tiny else "decode"
    on_gpu = not args.tiny
    t0 = time.perf_counter()
    try:
        model = build(args.layers, args.vocab, "cuda" if on_gpu else "cpu", LLAMA3_8B if on_gpu else TINY)
        for kind in kinds:
            prepare(model, kind)
            for b in args.batches if on_gpu else ():
                results.setdefault("linears_us", {})[f"{kind}_b{b}"] = us = linears_us(model, b)
                results.setdefault("lm_head_us", {})[f"{kind}_b{b}"] = hus = head_us(model, b)
                write_json(name, results)
                print(kind, b, f"block linears of one step, CUDA graph: {us:.0f} us; lm_head {hus:.0f} us", flush=True)
            if args.skip_generate:
                continue
            for b in args.batches:
                key = f"{kind}_b{b}"
                t1 = time.perf_counter()
                tps = tokens_per_s(model, b, args.new_tokens)
                results["tokens_per_s"][key] = tps
                results["seconds"][key] = time.perf_counter() - t1  # compile + capture + 2 runs
                write_json(name, results)
                print(kind, b, f"{tps:.1f} tokens/s", flush=True)
                if args.profile:
                    if on_gpu:
                        print(kind, b, "compile counters:", compile_report(), flush=True)
                    results.setdefault("profile", {})[key] = decode_breakdown(model, b, args.new_tokens, *args.profile_tokens)
                    write_json(name, results)
    except Exception as exc:
        if not _timed_out(exc):
            raise
        results["stopped_at_s"] = time.perf_counter() - t0
        write_json(name, results)
        print(f"time limit ({args.time_limit} s) reached; kept {list(results['tokens_per_s'])}", flush=True)
    signal.alarm(0)
    where = env["gpus"][0] if env["gpus"] else "CPU (--tiny)"
    print(f"\nDecode, Llama-3-8B shapes ({args.layers} layers), static cache + compile, {where}, {env['date']}")
    print(f"{'W4 kind':>8} {'batch':>5} {'fp16 tok/s':>11} {'W4 tok/s':>9} {'speedup':>8} {'fp16 linears us':>16} {'W4 linears us':>14} {'speedup':>8}")
    tp, lu = results["tokens_per_s"], results.get("linears_us", {})
    for kind in KINDS[1:]:
        for b in args.batches:
            f, w = tp.get(f"fp16_b{b}"), tp.get(f"{kind}_b{b}")
            lf, lw = lu.get(f"fp16_b{b}"), lu.get(f"{kind}_b{b}")
            if not (w or lw):
                continue
            gen = f"{f:11.1f} {w:9.1f} {w / f:8.2f}" if f and w else f"{'-':>11} {'-':>9} {'-':>8}"
            lin = f"{lf:16.0f} {lw:14.0f} {lf / lw:8.2f}" if lf and lw else ""
            print(f"{kind:>8} {b:>5} {gen} {lin}")
    if results.get("profile"):
        from decode_profile import legend, table

        print("\nWhere a decode step's time goes (µs per step, counts per step):")
        print(table(results["profile"]))
        print(legend())


if __name__ == "__main__":
    main()
