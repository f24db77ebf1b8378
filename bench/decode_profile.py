"""Where a decode token's time goes: a device-side breakdown of `generate`'s steady-state steps (bench/decode.py --profile).

Two profiled `generate` calls, `short` and `long` new tokens, after compile and warm-up; every sum is taken over
each whole call and the per-token figure is (long - short) / (long - short tokens): prefill, cache set-up and
the first step's extra work cancel, what is left is what each further decode step costs. Wall time per token is
measured the same way without the profiler (its host-side cost would inflate the idle time).

A record is one interval on the device timeline (a kernel, a memcpy, a memset; on the CPU smoke path, a top-level
aten / lowbit op), put in one category by its name (`category`), and tagged with what launched it: a CUDA graph
replay ("graph") or a launch from the host ("host"), found through the CUPTI correlation id it shares with its
runtime call. Runtime calls (cudaGraphLaunch, cudaLaunchKernel, cudaStreamSynchronize, ...) are counted per token.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field

# (category, pattern searched in the kernel name); the first match wins, so the specific ones come first.
# Names seen on H100/H200 (torch 2.11, CUDA 13): our Triton kernels by their @triton.jit function names (found in
# the package, `lowbit_kernel_names`); cuBLAS "nvjet_hsh_...", "sm90_xmma_gemm_...", "gemv2T_kernel_val<...>",
# "cutlass::Kernel2<cutlass_80_..._s16816gemm...>", "cublasLt::splitKreduce_kernel"; cuDNN / flash attention
# "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_...", "pytorch_flash::flash_fwd_splitkv_kernel",
# "fmha_cutlassF_..."; inductor "triton_poi_fused_...", "triton_red_fused_...", "triton_per_fused_..."
# (its matmul templates "triton_tem_fused_mm..." are GEMMs); eager aten "void at::native::..."; argmax is an aten
# reduction "ReduceOp<..., ArgMaxOps<...>>"; memcpy / memset as kineto names them ("Memcpy DtoH (Device ->
# Pinned)", "Memset (Device)"). On the CPU smoke path the records are aten ops ("aten::mm", "aten::argmax").
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("memcpy", r"^(memcpy|memset)"),
    ("sampling", r"argmax|argmin|topk|multinomial|^aten::(sort|max)$"),
    ("gemm", r"^triton_tem_"),
    ("inductor", r"^triton_"),  # before attention: inductor names kernels after the ops they fuse ("..._attention_0")
    ("attention", r"sdpa|flash|fmha|attention|attn|^cudnn"),
    ("gemm", r"gemm|gemv|nvjet|cutlass|xmma|cublas|splitkreduce|^aten::(mm|addmm|bmm|matmul|linear)$"),
    ("aten", r"at::native|^void at::|^aten::|^at::|elementwise_kernel|reduce_kernel"),
)
OURS = "lowbit"
OTHER = "other"
ORDER = (OURS, "gemm", "attention", "inductor", "aten", "sampling", "memcpy", OTHER)
LEGEND = {
    OURS: "lowbit's Triton kernels (quantized linears)",
    "gemm": "cuBLAS / cutlass / inductor-template GEMMs and GEMVs (fp16 linears, fp16 lm_head)",
    "attention": "SDPA kernels (cuDNN, flash, memory-efficient)",
    "inductor": "inductor-generated Triton kernels (norms, rotary, residual adds, cache writes, casts)",
    "aten": "eager aten kernels (generate's host loop: cat, fills, compares; torch ops inside custom ops)",
    "sampling": "argmax / top-k / multinomial",
    "memcpy": "memcpy and memset",
    OTHER: "anything else",
}
TOP_NAMES = 30  # kernels kept by name per (kind, batch) in the JSON, the longest per token first
_LAUNCH = re.compile(r"^(cudaLaunchKernel|cuLaunchKernel|cudaLaunchKernelExC|cudaLaunchCooperativeKernel)")
_SYNC = re.compile(r"^cuda(Stream|Device|Event)Synchronize")


def lowbit_kernel_names() -> tuple[str, ...]:
    """The @triton.jit kernels of lowbit.kernels.triton (the names CUPTI reports for their launches)."""
    import importlib
    import pkgutil

    try:
        from triton.runtime.jit import JITFunction

        import lowbit.kernels.triton as pkg
    except ImportError:
        return ()
    kinds = (JITFunction,)
    try:  # under TRITON_INTERPRET=1 (CI) @triton.jit makes an InterpretedFunction instead
        from triton.runtime.interpreter import InterpretedFunction

        kinds += (InterpretedFunction,)
    except ImportError:
        pass
    names = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for obj in vars(module).values():
            fn = getattr(obj, "fn", None)
            if isinstance(obj, kinds) and fn is not None and fn.__name__.endswith("_kernel"):
                names.add(fn.__name__)  # helpers (@triton.jit functions called from kernels) never launch
    return tuple(sorted(names))


class Categoriser:
    def __init__(self, ours: tuple[str, ...] | None = None):
        ours = lowbit_kernel_names() if ours is None else ours
        # a Triton kernel's name is its function's, possibly with a specialisation suffix ("_gemv_kernel_0d1d2d")
        self.ours = re.compile("^(" + "|".join(map(re.escape, ours)) + r")(_|$)") if ours else None
        self.patterns = [(c, re.compile(p, re.IGNORECASE)) for c, p in CATEGORIES]

    def __call__(self, name: str) -> str:
        name = name.strip()
        if self.ours is not None and self.ours.match(name):
            return OURS
        for cat, pattern in self.patterns:
            if pattern.search(name):
                return cat
        return OTHER


@dataclass
class Record:
    """One device interval (µs) or one runtime call on the host."""

    name: str
    start_us: float
    dur_us: float
    origin: str = "host"  # device records: "graph" (replayed from a CUDA graph) or "host" (launched eagerly)


@dataclass
class Trace:
    device: list[Record] = field(default_factory=list)
    runtime: list[Record] = field(default_factory=list)


def busy_us(records: list[Record]) -> float:
    """Length of the union of the records' intervals: time the device had at least one of them running."""
    total, end = 0.0, float("-inf")
    for r in sorted(records, key=lambda r: r.start_us):
        stop = r.start_us + r.dur_us
        if r.start_us >= end:
            total += r.dur_us
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def top_level(records: list[Record]) -> list[Record]:
    """The records not nested inside an earlier one (one thread's op tree -> its roots)."""
    out, end = [], float("-inf")
    for r in sorted(records, key=lambda r: (r.start_us, -r.dur_us)):
        if r.start_us >= end:
            out.append(r)
            end = r.start_us + r.dur_us
    return out


def trace_of(prof, on_cuda: bool) -> Trace:
    """Records from a finished torch.profiler run (kineto's events, no tree building). On the CPU smoke path,
    the main thread's top-level aten / lowbit ops stand in for device records."""
    from torch.autograd import DeviceType

    events = list(prof.profiler.kineto_results.events())
    trace = Trace()
    rec = lambda e: Record(e.name(), e.start_ns() / 1e3, e.duration_ns() / 1e3)  # noqa: E731
    if not on_cuda:
        ops = [e for e in events if e.device_type() == DeviceType.CPU and e.name().startswith(("aten::", "lowbit::"))]
        threads = {}
        for e in ops:
            threads.setdefault(e.start_thread_id(), []).append(rec(e))
        main = max(threads.values(), key=len) if threads else []
        trace.device = top_level(main)
        return trace
    runtime_by_corr = {}
    device = []
    for e in events:
        if e.device_type() == DeviceType.CUDA:
            device.append((e.correlation_id(), rec(e)))
        elif e.name().startswith(("cuda", "cu")) and not e.name().startswith("cudnn"):
            r = rec(e)
            trace.runtime.append(r)
            runtime_by_corr[e.correlation_id()] = r.name
    for corr, r in device:
        launcher = runtime_by_corr.get(corr, "")
        r.origin = "graph" if "GraphLaunch" in launcher else "host" if launcher else "?"
        trace.device.append(r)
    return trace


def summarise(trace: Trace, categorise: Categoriser) -> dict:
    """Totals over one trace: device µs per category, per origin, busy µs, counts of records and runtime calls."""
    by_cat = {c: 0.0 for c in ORDER}
    n_cat = {c: 0 for c in ORDER}
    by_origin: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for r in trace.device:
        c = categorise(r.name)
        by_cat[c] += r.dur_us
        n_cat[c] += 1
        by_origin[r.origin] = by_origin.get(r.origin, 0.0) + r.dur_us
        short = f"{c}: {r.name[:100]}"  # cut: C++ template names run to kilobytes
        by_name[short] = by_name.get(short, 0.0) + r.dur_us
    names = [r.name for r in trace.runtime]
    return {
        "device_us": by_cat,
        "device_n": n_cat,
        "origin_us": by_origin,
        "name_us": by_name,
        "busy_us": busy_us(trace.device),
        "device_sum_us": sum(by_cat.values()),
        "kernels": sum(1 for r in trace.device if categorise(r.name) != "memcpy"),
        "graph_launches": sum(1 for n in names if "GraphLaunch" in n),
        "host_launches": sum(1 for n in names if _LAUNCH.match(n)),
        "syncs": sum(1 for n in names if _SYNC.match(n)),
        "sync_us": sum(r.dur_us for r in trace.runtime if _SYNC.match(r.name)),
        "memcpy_calls": sum(1 for n in names if n.startswith(("cudaMemcpy", "cudaMemset"))),
    }


def per_token(short: dict, long: dict, tokens: int) -> dict:
    """(long - short) / tokens, key by key (nested dicts too)."""
    out = {}
    for key, b in long.items():
        a = short.get(key, {} if isinstance(b, dict) else 0)
        out[key] = per_token(a, b, tokens) if isinstance(b, dict) else (b - a) / tokens
    return out


def breakdown(run, short: int, long: int, profile_fn, on_cuda: bool, categorise: Categoriser | None = None, sync=lambda: None,
              reps: int = 3) -> dict:
    """Per-token breakdown of `run(n)` (generate with n new tokens, warm). `profile_fn()` is a torch.profiler
    context. Returns per-token figures in µs / counts: wall (unprofiled), profiled wall, device busy, idle =
    wall - busy, device µs and record counts by category, µs by origin ("graph" / "host") and of the
    TOP_NAMES longest kernels by name, and launch / sync counts."""
    categorise = categorise or Categoriser()

    def wall(n: int) -> float:
        times = []
        for _ in range(reps):
            sync()
            t = time.perf_counter()
            run(n)
            sync()
            times.append((time.perf_counter() - t) * 1e6)
        return statistics.median(times)

    walls = {n: wall(n) for n in (short, long)}
    with profile_fn():  # the profiler's own first-use set-up, outside the measured calls
        run(2)
        sync()
    sums, pwalls = {}, {}
    for n in (short, long):
        with profile_fn() as prof:
            t = time.perf_counter()
            run(n)
            sync()
            pwalls[n] = (time.perf_counter() - t) * 1e6
        sums[n] = summarise(trace_of(prof, on_cuda), categorise)
    tokens = long - short
    out = per_token(sums[short], sums[long], tokens)
    out["name_us"] = dict(sorted(out["name_us"].items(), key=lambda kv: -kv[1])[:TOP_NAMES])
    out["wall_us"] = (walls[long] - walls[short]) / tokens
    out["profiled_wall_us"] = (pwalls[long] - pwalls[short]) / tokens
    out["idle_us"] = out["wall_us"] - out["busy_us"]
    out["tokens"] = [short, long]
    return out


COLUMNS = (("wall_us", "wall"), ("busy_us", "busy"), ("idle_us", "idle"), *((c, c) for c in ORDER))
COUNTS = (("kernels", "kern"), ("host_launches", "hostL"), ("graph_launches", "graphL"), ("syncs", "sync"), ("sync_us", "sync us"))


def table(rows: dict[str, dict]) -> str:
    """One line per (kind, batch): µs per token (per batch step, not per sequence), then counts per token."""
    head = f"{'kind':>9} {'batch':>5} " + " ".join(f"{h:>9}" for _, h in COLUMNS) + " " + " ".join(f"{h:>7}" for _, h in COUNTS)
    lines = [head]
    for key, r in rows.items():
        kind, _, b = key.rpartition("_b")
        cells = [r.get(k, 0.0) if k in r else r["device_us"].get(k, 0.0) for k, _ in COLUMNS]
        lines.append(f"{kind:>9} {b:>5} " + " ".join(f"{v:9.0f}" for v in cells) + " " + " ".join(f"{r[k]:7.1f}" for k, _ in COUNTS))
    return "\n".join(lines)


def legend() -> str:
    parts = ["per decode step (one token per sequence), from (long - short) profiled generate calls:",
             "  wall: host wall-clock µs per step, unprofiled; busy: µs the GPU ran at least one kernel/copy;",
             "  idle = wall - busy (host work in generate, sync per token, graph launch, gaps between launches)",
             *(f"  {c}: device µs summed, {LEGEND[c]}" for c in ORDER),
             "  kern: device kernels per step; hostL: kernel launches from the host; graphL: cudaGraphLaunch calls;",
             "  sync: cuda*Synchronize calls; sync us: host µs blocked in them"]
    return "\n".join(parts)
