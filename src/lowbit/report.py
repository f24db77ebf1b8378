"""Resource accounting for the end-of-run summary: wall time, peak RSS, peak VRAM per device."""

from __future__ import annotations

import math
import resource
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class RssSampler:
    """Samples the current RSS in a thread: ru_maxrss is process-lifetime, this measures one phase."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def release_freed_memory() -> None:
    """Hand memory freed by the last block back to the OS (glibc keeps freed heap pages otherwise, so RSS
    would carry every block's temporaries). A no-op where malloc_trim does not exist."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_vram_bytes(device=None) -> dict[str, int]:
    """Peak memory this process allocated on each visible GPU (or on `device` alone, if a CUDA device)."""
    if not torch.cuda.is_available():
        return {}
    if device is not None:
        device = torch.device(device)
        return {str(device): torch.cuda.max_memory_allocated(device)} if device.type == "cuda" else {}
    return {f"cuda:{i}": torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())}


class Phases:
    """Wall seconds per phase of a run ("scan", "capture", "blocks", ...), summed over repeated phases.

    CUDA work is asynchronous: a phase ends by synchronizing this process's device, so its seconds include
    the kernels it queued (without that the time would land in whichever later phase waits first)."""

    def __init__(self, device=None):
        self.seconds: dict[str, float] = {}
        self.device = device

    def sync(self) -> None:
        if self.device is not None and torch.device(self.device).type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the loop's stream: not the writer's side stream

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class BlockPhases:
    """Wall seconds per phase of the block loop on this process, exclusive: a phase inside another (collectives
    inside GPTQ's solve, the solve inside the method's step) is counted once, in the innermost one.

    Phases of one block: load (tensors read from the shards onto the device), targets (the fp chain through
    the block: AutoRound's targets), experts (MoE routing counts), stats (calibration forwards accumulating
    statistics: GPTQ's Hessians, AWQ's activation statistics), solve (GPTQ's column solves and the results
    shared), setup (AutoRound's trainer built before its first step), train (AutoRound's steps), export (AutoRound's
    trained roundings quantized and shared), search (AWQ's scale and clipping searches), method (the rest of the
    method's step, RTN), collectives (waiting in
    torch.distributed collectives, the slowest process included: DistributedReducer.phases), propagate (the
    quantized block replayed: the next block's inputs), write (rank 0: packing queued, and the wait for the previous
    block's write, which a thread does while the next block computes: export/shards.BackgroundWrites). Each boundary
    synchronizes the loop's CUDA stream (a few per block and stage, never per step), so queued kernels land in the
    phase that queued them. Always on: the cost is those synchronizations."""

    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else None
        self.totals: dict[str, float] = {}
        self.per_block: list[dict[str, float]] = []
        self._block: dict[str, float] = {}
        self._stack: list[list] = []  # [name, seconds of the phases inside it]

    def sync(self) -> None:
        """The block loop's stream only: a device-wide synchronize would also wait for the background writer's
        copies (export/shards.py) and put them back on the loop's path (the load phase grew by them on an H200)."""
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    @contextmanager
    def __call__(self, name: str):
        self.sync()
        start = time.perf_counter()
        self._stack.append([name, 0.0])
        try:
            yield
        finally:
            self.sync()
            total = time.perf_counter() - start
            _, inner = self._stack.pop()
            self._record(name, total - inner)
            if self._stack:  # the enclosing phase counts it as inner time
                self._stack[-1][1] += total

    def add(self, name: str, seconds: float) -> None:
        """`seconds` of phase `name`, measured by the caller (collectives): taken out of the enclosing phase."""
        self._record(name, seconds)
        if self._stack:
            self._stack[-1][1] += seconds

    def _record(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds
        self._block[name] = self._block.get(name, 0.0) + seconds

    def block_done(self) -> None:
        self.per_block.append({k: round(v, 3) for k, v in self._block.items()})
        self._block = {}


def phase_text(seconds: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f} s" for k, v in sorted(seconds.items(), key=lambda kv: -kv[1]))


def gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


@dataclass
class RunSummary:
    seconds: float = 0.0
    peak_rss: int = 0
    peak_vram: dict[str, int] = field(default_factory=dict)
    quantized: list[str] = field(default_factory=list)
    kept_fp: dict[str, str] = field(default_factory=dict)  # module -> reason
    output_dir: str = ""
    checkpoint_bytes: int = 0
    output_bytes: int = 0
    method: str = ""
    scheme: str = ""
    block_losses: list[tuple[int, float, float]] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)  # checkpoint tensors that match no model tensor
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds per phase (report.Phases)
    block_seconds: list[float] = field(default_factory=list)  # wall seconds of each block, in order
    placements: dict[int, dict[str, str]] = field(default_factory=dict)  # block -> {linear: device} when a block was split
    block_phases: dict[str, float] = field(default_factory=dict)  # this process's block loop by phase (BlockPhases.totals)
    block_phase_seconds: list[dict] = field(default_factory=list)  # the same per block
    ranks: list[dict] = field(default_factory=list)  # data parallel: per process, its peak RSS / VRAM and collective seconds
    # mixture of experts: experts module -> routed calibration tokens per expert; expert -> tokens, for RTN fallbacks
    routed: dict[str, list[int]] = field(default_factory=dict)
    experts_rtn: dict[str, int] = field(default_factory=dict)
    experts_all_tokens: bool = False

    def add_experts(self, prefix: str, plan) -> None:
        """One block's ExpertPlan (calib/experts.py)."""
        self.routed.update({f"{prefix}.{n}": counts for n, counts in plan.routed.items()})
        self.experts_rtn.update({f"{prefix}.{n}": c for n, c in plan.fallback.items()})
        self.experts_all_tokens = plan.all_tokens

    def expert_lines(self) -> list[str]:
        if not self.routed:
            return []
        counts = sorted(c for per in self.routed.values() for c in per)
        how = "every token through every expert" if self.experts_all_tokens else "routed tokens only"
        out = [f"  experts: {len(counts)} in {len(self.routed)} blocks, calibrated on {how}; routed tokens per expert "
               f"min {counts[0]} / median {counts[len(counts) // 2]} / max {counts[-1]}"]
        if self.experts_rtn:
            shown = ", ".join(f"{n} ({c})" for n, c in list(self.experts_rtn.items())[:6])
            out.append(f"  experts quantized with RTN (too few routed tokens): {len(self.experts_rtn)}: {shown}{' ...' if len(self.experts_rtn) > 6 else ''}")
        return out

    def lines(self) -> list[str]:
        vram = ", ".join(f"{d} {gib(b)}" for d, b in self.peak_vram.items()) or "no GPU used"
        reasons: dict[str, list[str]] = {}
        for name, why in self.kept_fp.items():
            reasons.setdefault(why, []).append(name)
        kept = "; ".join(f"{', '.join(names[:4])}{' ...' if len(names) > 4 else ''} ({len(names)}: {why})" for why, names in reasons.items())
        lines = [
            f"lowbit summary: {self.method} {self.scheme} -> {self.output_dir}",
            f"  time {self.seconds:.1f} s | peak RSS {gib(self.peak_rss)} (checkpoint {gib(self.checkpoint_bytes)}) | peak VRAM {vram}",
            f"  quantized {len(self.quantized)} linears | output {gib(self.output_bytes)}",
            f"  kept in full precision: {kept or 'nothing'}",
            *self.expert_lines(),
        ]
        if self.phases:
            lines.append("  phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items()))
        if self.block_phases and not self.ranks:
            lines.append(f"  block loop by phase: {phase_text(self.block_phases)}")
        if self.placements:
            devices = sorted({d for p in self.placements.values() for d in p.values()})
            lines.append(f"  {len(self.placements)} blocks spread over {', '.join(devices)} (too big for one device with the method's state)")
        for r in self.ranks:
            rank_vram = ", ".join(f"{d} {gib(b)}" for d, b in r["peak_vram_bytes"].items()) or "no GPU"
            lines.append(f"  rank {r['rank']}: peak RSS {gib(r['peak_rss_bytes'])}, peak VRAM {rank_vram}, in collectives {r['collective_seconds']:.1f} s")
            if r.get("block_phases"):
                lines.append(f"    block loop by phase: {phase_text(r['block_phases'])}")
        return lines

    def to_dict(self) -> dict:
        return {
            "seconds": round(self.seconds, 2),
            "peak_rss_bytes": self.peak_rss,
            "peak_vram_bytes": self.peak_vram,
            "quantized": self.quantized,
            "kept_fp": self.kept_fp,
            "checkpoint_bytes": self.checkpoint_bytes,
            "output_bytes": self.output_bytes,
            "method": self.method,
            "scheme": self.scheme,
            # a loss that is not finite (a diverged block: AutoRound warns) as null, not NaN: strict JSON readers refuse NaN
            "block_losses": [[i, *(v if math.isfinite(v) else None for v in losses)] for i, *losses in self.block_losses],
            "unmapped_checkpoint_tensors": self.unmapped,
            "phases": {k: round(v, 2) for k, v in self.phases.items()},
            "block_seconds": [round(v, 2) for v in self.block_seconds],
            "block_phases": {k: round(v, 2) for k, v in self.block_phases.items()},
            "block_phase_seconds": self.block_phase_seconds,
            "placements": self.placements,
            "ranks": self.ranks,
            "experts_routed_tokens": self.routed,
            "experts_rtn_fallback": self.experts_rtn,
            "experts_all_tokens": self.experts_all_tokens,
        }
