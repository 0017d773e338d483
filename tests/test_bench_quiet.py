"""bench/quiet.py: a benchmark target is called met only from a quiet machine."""

from __future__ import annotations

import time

from bench.quiet import NOISY, LoadWatch, verdict


def _watch(load: float, share, cores: int = 2) -> LoadWatch:
    watch = LoadWatch(cores=cores)
    watch.load_before, watch.load_after, watch.other_share = (load, load, load), (load, load, load), share
    return watch


def test_verdict_only_from_a_quiet_machine():
    quiet, busy_load, busy_others, unknown = _watch(0.2, 0.02), _watch(3.1, 0.02), _watch(0.2, 0.6), _watch(0.2, None)
    assert verdict(True, quiet) == "met" and verdict(False, quiet) == "NOT met"
    for noisy in (busy_load, busy_others, unknown):
        assert verdict(True, noisy) == NOISY and verdict(False, noisy) == NOISY
    assert verdict(True, quiet, busy_others) == NOISY  # a ratio needs both sides quiet
    assert verdict(True) == NOISY
    assert "busy" in busy_others.describe() and "unknown" in unknown.describe()


def test_other_share_is_machine_cpu_time_minus_our_own(monkeypatch):
    import bench.quiet as quiet

    busy = iter([100.0, 103.0])  # the machine's non-idle CPU seconds at start and end
    own = iter([10.0, 12.5])     # ours (children included): 2.5 of those 3 seconds
    clock = iter([50.0, 52.0])   # 2 s on 2 cores = 4 CPU seconds available
    monkeypatch.setattr(quiet, "_busy_seconds", lambda: next(busy))
    monkeypatch.setattr(quiet, "_own_cpu_seconds", lambda: next(own))
    monkeypatch.setattr(quiet.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(quiet.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    with LoadWatch(cores=2) as watch:
        pass
    assert watch.other_share == 0.5 / 4 and watch.quiet is False  # 12.5% > 10%
    # without /proc/stat the share is unknown, and so is quietness: no verdict
    monkeypatch.setattr(quiet, "_busy_seconds", lambda: None)
    monkeypatch.setattr(quiet.time, "monotonic", iter([0.0, 1.0]).__next__)
    monkeypatch.setattr(quiet, "_own_cpu_seconds", lambda: 0.0)
    with LoadWatch(cores=2) as unknown:
        pass
    assert unknown.other_share is None and unknown.quiet is None and verdict(True, unknown) == NOISY


def test_real_watch_reads_proc_stat():
    with LoadWatch() as watch:
        time.sleep(0.05)
    assert watch.other_share is not None and watch.other_share >= 0 and watch.load_after is not None
