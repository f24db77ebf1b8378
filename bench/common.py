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
    """Median time in microseconds of `fn()`, each call preceded by a write of 256 MiB (flushes L2)."""

    def __init__(self, device="cuda:0", reps: int = 40, warmup: int = 5):
        self.flush = torch.empty(256 * 1024**2 // 4, dtype=torch.int32, device=device)
        self.reps, self.warmup = reps, warmup

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for s, e in zip(starts, ends):
            self.flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        times = sorted(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))
        return times[len(times) // 2]


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    day = datetime.date.today().isoformat()
    path = RESULTS / f"{name}-{day}.json"
    path.write_text(json.dumps(payload, indent=1))
    if os.environ.get("OUT"):
        shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    return path
