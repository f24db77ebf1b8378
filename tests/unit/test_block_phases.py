"""report.BlockPhases: exclusive seconds per phase of the block loop (a phase inside another counts once, in the
innermost; collectives timed by the reducer are taken out of the phase they ran in), on a clock the test drives."""

import lowbit.report as report
from lowbit.report import BlockPhases, RunSummary


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_nested_phases_and_collectives_are_exclusive(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(report.time, "perf_counter", clock)
    phases = BlockPhases()
    with phases("method"):
        clock.now += 1.0  # the method's own work
        with phases("stats"):
            clock.now += 2.0
            clock.now += 0.5
            phases.add("collectives", 0.5)  # a reduction inside the statistics, timed by the reducer
        with phases("solve"):
            clock.now += 3.0
        clock.now += 0.25
    with phases("propagate"):
        clock.now += 4.0
    phases.block_done()
    with phases("load"):
        clock.now += 1.5
    phases.block_done()
    assert phases.totals == {"method": 1.25, "stats": 2.0, "collectives": 0.5, "solve": 3.0, "propagate": 4.0, "load": 1.5}
    assert sum(phases.totals.values()) == clock.now  # every second counted once
    assert phases.per_block == [{"method": 1.25, "stats": 2.0, "collectives": 0.5, "solve": 3.0, "propagate": 4.0}, {"load": 1.5}]


def test_summary_prints_the_phases_of_each_process():
    one = RunSummary(block_phases={"stats": 2.0, "solve": 3.0})
    assert "  block loop by phase: solve 3.00 s, stats 2.00 s" in one.lines()
    two = RunSummary(ranks=[{"rank": r, "peak_rss_bytes": 0, "peak_vram_bytes": {}, "collective_seconds": 0.1, "block_phases": {"train": 1.0 + r}} for r in (0, 1)])
    lines = two.lines()
    assert lines.count("    block loop by phase: train 1.00 s") == 1 and lines.count("    block loop by phase: train 2.00 s") == 1
    assert two.to_dict()["ranks"][1]["block_phases"] == {"train": 2.0}
