"""GPU timing shared by `lowbit tune-kernels` and the bench scripts: CUDA events, median, L2 flushed."""

from __future__ import annotations

import torch


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
