"""Bench-only: profile a whole `lowbit quantize` process with torch.profiler when BENCH_PROFILE_OUT is set
(bench/dist_gpu.py --profile puts this folder on PYTHONPATH for the profiled runs; launch.py's processes
inherit it, so every rank profiles itself). At exit each process that ran CUDA kernels writes
<BENCH_PROFILE_OUT>/profile-rank<R>.txt: the top kernels / ops by device time and by host time, and how busy
the device was (the union of its kernels' intervals over the profiled span, and per second of it: a step bound
by the host leaves it idle)."""

import atexit
import os

if os.environ.get("BENCH_PROFILE_OUT"):  # the launcher of --nproc too: it runs no kernels and writes nothing
    import torch
    from torch.profiler import ProfilerActivity, profile

    _prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    _prof.__enter__()

    def _busy(events) -> tuple[float, float]:
        spans = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        if not spans:
            return 0.0, 0.0
        busy, (cur_s, cur_e) = 0.0, spans[0]
        for s, e in spans[1:]:
            if s > cur_e:
                busy, cur_s = busy + cur_e - cur_s, s
            cur_e = max(cur_e, e)
        return (busy + cur_e - cur_s) / 1e6, (spans[-1][1] - spans[0][0]) / 1e6

    def _timeline(events) -> str:
        """The device's busy share per second of the span, in percent (the training's seconds stand out)."""
        spans = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        start, seconds = spans[0][0], int((spans[-1][1] - spans[0][0]) / 1e6) + 1
        busy = [0.0] * seconds
        end = start
        for s, e in spans:  # the union of the intervals, cut at whole seconds
            s = max(s, end)
            while s < e:
                i = int((s - start) / 1e6)
                cut = min(e, start + (i + 1) * 1e6)
                busy[i] += cut - s
                s = cut
            end = max(end, e)
        return " ".join(f"{b / 1e4:.0f}" for b in busy)

    @atexit.register
    def _dump():
        _prof.__exit__(None, None, None)
        events = _prof.events()
        busy, span = _busy(events)
        if not span:
            return
        rank = os.environ.get("RANK", "0")
        averages = _prof.key_averages()
        table = averages.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=70)
        host = averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70)
        text = (f"rank {rank}: device busy {busy:.2f} s of a {span:.2f} s span ({busy / span:.0%})\n"
                f"device busy per second, %: {_timeline(events)}\n{table}\nby host time:\n{host}\n")
        os.makedirs(os.environ["BENCH_PROFILE_OUT"], exist_ok=True)
        with open(os.path.join(os.environ["BENCH_PROFILE_OUT"], f"profile-rank{rank}.txt"), "w") as f:
            f.write(text)
