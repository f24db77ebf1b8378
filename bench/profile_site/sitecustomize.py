"""Bench-only: profile a whole `lowbit quantize` process with torch.profiler when BENCH_PROFILE_OUT is set
(bench/dist_gpu.py --profile puts this folder on PYTHONPATH for the profiled runs; launch.py's processes
inherit it, so every rank profiles itself). At exit each process that ran CUDA kernels writes
<BENCH_PROFILE_OUT>/profile-rank<R>.txt: the top kernels / ops by device time and by host time, and how busy
the device was (the union of its kernels' intervals over the profiled span, and per second of it: a step bound
by the host leaves it idle).

BENCH_PROFILE_WINDOW="FIRST:COUNT" (dist_gpu.py --profile_window) profiles only AutoRound steps FIRST to
FIRST + COUNT of the run (steps counted over all blocks: with 200 iterations, 250:20 is block 1's steps 50-69,
steady state) instead: each rank writes profile-window-rank<R>.txt (per step: wall, device busy, of which
NCCL kernels, compute kernels alone, and idle; the top kernels) and trace-rank<R>.json.gz (a chrome trace of the
window: the ranks' timelines side by side show who waits for whom). The step is counted by wrapping
lowbit.algorithms.autoround.sign_sgd_step, called once per step."""

import atexit
import os

if os.environ.get("BENCH_PROFILE_OUT") and os.environ.get("BENCH_PROFILE_WINDOW"):  # the --nproc launcher too: it takes no step
    import gzip
    import shutil
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    def _intervals(events, keep=lambda name: True):
        """The union of the CUDA kernels' intervals (us) whose name `keep` accepts: (busy seconds, [(start, end)])."""
        spans = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == torch.autograd.DeviceType.CUDA and keep(e.name))
        merged = []
        for s, e in spans:
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        return sum(e - s for s, e in merged) / 1e6, merged

    def _window_report(prof, steps: int, wall: float) -> None:
        rank = os.environ.get("RANK", "0")
        out = os.environ["BENCH_PROFILE_OUT"]
        os.makedirs(out, exist_ok=True)
        events = prof.events()
        busy, _ = _intervals(events)
        nccl, _ = _intervals(events, lambda n: "nccl" in n.lower())
        compute, _ = _intervals(events, lambda n: "nccl" not in n.lower())
        ms = lambda x: f"{1e3 * x / steps:.2f}"  # noqa: E731 - per step, milliseconds
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)
        with open(os.path.join(out, f"profile-window-rank{rank}.txt"), "w") as f:
            f.write(f"rank {rank}: {steps} steps, per step (ms): wall {ms(wall)}, device busy {ms(busy)}, NCCL kernels {ms(nccl)} "
                    f"(waiting for the other ranks included), compute kernels alone {ms(compute)}, device idle {ms(wall - busy)}\n{table}\n")
        trace = os.path.join(out, f"trace-rank{rank}.json")
        prof.export_chrome_trace(trace)
        with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(trace)

    def _install_window(first: int, count: int) -> None:
        import lowbit.algorithms.autoround as ar

        real, state = ar.sign_sgd_step, {"step": 0}

        def counted(groups):
            real(groups)
            state["step"] += 1
            sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
            if state["step"] == first:
                sync()
                state["prof"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                state["prof"].__enter__()
                state["t0"] = time.perf_counter()
            elif state["step"] == first + count and "prof" in state:
                sync()
                wall = time.perf_counter() - state["t0"]
                prof = state.pop("prof")
                prof.__exit__(None, None, None)
                _window_report(prof, count, wall)

        ar.sign_sgd_step = counted

    _first, _count = (int(x) for x in os.environ["BENCH_PROFILE_WINDOW"].split(":"))
    _install_window(_first, _count)

elif os.environ.get("BENCH_PROFILE_OUT"):  # the launcher of --nproc too: it runs no kernels and writes nothing
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
