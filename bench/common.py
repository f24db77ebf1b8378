"""Shared by the bench scripts: timing with CUDA events (median, L2 flushed before every call), the
environment record, and the JSON writer (bench/results/<name>-<date>.json, copied to $OUT when set)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    import triton
    import transformers

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpus": gpus,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


class Timer:
    """Median time in microseconds of `fn()`, each call preceded by a write of 256 MiB (flushes L2).

    `fn` is captured once in a CUDA graph and the graph is replayed: the host-side cost of a call (Python
    wrappers, Triton's launcher: tens of microseconds, more than a decode-size kernel on the GPU) would
    otherwise be timed as GPU idle time. Decode runs under CUDA graphs too. If capture fails, eager calls.
    """

    def __init__(self, device="cuda:0", reps: int = 40, warmup: int = 3):
        self.flush = torch.empty(256 * 1024**2 // 4, dtype=torch.int32, device=device)
        self.reps, self.warmup = reps, warmup

    def _graph(self, fn):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph

    def __call__(self, fn, graph: bool = True) -> float:
        for _ in range(self.warmup):
            fn()
        run, g = fn, None
        if graph:
            try:
                g = self._graph(fn)
                run = g.replay
            except Exception as exc:  # noqa: BLE001 - time eagerly instead, and say so
                print(f"graph capture failed ({exc}); timing eagerly")
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for s, e in zip(starts, ends):
            self.flush.zero_()
            s.record()
            run()
            e.record()
        torch.cuda.synchronize()
        del g
        times = sorted(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))
        return times[len(times) // 2]


def graph_replay_us(step, reps: int = 30) -> float:
    """Median µs of one replay of `step()` captured in one CUDA graph, after a warm call on a side stream
    (Triton compiles, configs get picked). No L2 flush: for sequences whose weights far exceed L2."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        step()
    graph.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    del graph
    return sorted(times)[len(times) // 2]


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    day = datetime.date.today().isoformat()
    path = RESULTS / f"{name}-{day}.json"
    path.write_text(json.dumps(payload, indent=1))
    if os.environ.get("OUT"):
        shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    return path
