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

from lowbit.kernels.timing import Timer  # noqa: F401 - the bench scripts import it from here

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
