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


def write_random_shards(tensors, path: Path, stem: str = "model", shard_bytes: int = 4 << 30) -> int:
    """Random bf16 values for (name, tensor) pairs (shapes only: meta tensors are fine), written in shards
    `<stem>-NNNNN.safetensors` with `<stem>.safetensors.index.json`; returns the bytes written. Norm weights
    and scalars (1-D) near 1, other floats N(0, 0.02^2), integers 0; a tensor seen twice (tied) is written once.
    Generated on the GPU when there is one: the bench machines write multi-GB checkpoints in seconds."""
    from safetensors.torch import save_file

    gen_device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(gen_device).manual_seed(0)
    pending, size, index, total, seen = {}, 0, {}, 0, set()

    def flush():
        nonlocal pending, size
        if pending:
            name = f"{stem}-{len(set(index.values())) + 1:05d}.safetensors"
            save_file(pending, path / name)
            index.update({k: name for k in pending})
            pending, size = {}, 0

    for name, t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        if not t.is_floating_point():
            value = torch.zeros(t.shape, dtype=t.dtype)
        elif t.dim() == 1 and ("norm" in name or "scalar" in name) and not name.endswith(".bias"):
            value = (1 + 0.05 * torch.randn(t.shape, generator=gen, device=gen_device)).to(torch.bfloat16).cpu()
        else:
            value = (0.02 * torch.randn(t.shape, generator=gen, device=gen_device)).to(torch.bfloat16).cpu()
        pending[name] = value
        size += value.numel() * value.element_size()
        total += value.numel() * value.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    (path / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": index}))
    return total
