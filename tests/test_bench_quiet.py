"""bench/quiet.py: a benchmark target is called met only from a quiet machine."""

from __future__ import annotations

import time

from bench.quiet import NOISY, LoadWatch, verdict


def _watch(load: float, share, cores: int = 2, before=None) -> LoadWatch:
    watch = LoadWatch(cores=cores)
    watch.load_before, watch.load_after, watch.other_share = (load, load, load), (load, load, load), share
    watch.other_share_before = share if before is None else before
    return watch


def test_verdict_only_from_a_quiet_machine():
    quiet, busy_others, unknown = _watch(0.2, 0.02), _watch(0.2, 0.6), _watch(0.2, None)
    busy_before = _watch(0.2, 0.02, before=0.5)  # another job ran until the measurement started
    assert verdict(True, quiet) == "met" and verdict(False, quiet) == "NOT met"
    for noisy in (busy_others, busy_before, unknown):
        assert verdict(True, noisy) == NOISY and verdict(False, noisy) == NOISY
    assert verdict(True, quiet, busy_others) == NOISY  # a ratio needs both sides quiet
    assert verdict(True) == NOISY
    assert "busy" in busy_others.describe() and "unknown" in unknown.describe()


def test_a_load_average_left_by_our_own_previous_run_does_not_make_a_run_noisy():
    """The 1-minute load average includes the benchmark's own previous configuration: measured
    shares of others' CPU time (before and during) decide; the load average only where no share
    can be read."""
    assert verdict(True, _watch(1.5, 0.0)) == "met"
    assert _watch(3.1, None).quiet is False and _watch(0.2, None).quiet is None


class _Machine:
    """A fake /proc/stat and clock: ``run(seconds, others, ours)`` spends CPU seconds."""

    def __init__(self):
        self.now, self.busy, self.own = 50.0, 100.0, 10.0

    def run(self, seconds: float, others: float, ours: float = 0.0) -> None:
        self.now += seconds
        self.busy += others + ours
        self.own += ours


def _patch(monkeypatch, machine: _Machine, others_before: float) -> None:
    import bench.quiet as quiet

    monkeypatch.setattr(quiet, "_busy_seconds", lambda: machine.busy)
    monkeypatch.setattr(quiet, "_own_cpu_seconds", lambda: machine.own)
    monkeypatch.setattr(quiet.time, "monotonic", lambda: machine.now)
    monkeypatch.setattr(quiet.time, "sleep", lambda seconds: machine.run(seconds, others_before * seconds))
    monkeypatch.setattr(quiet.os, "getloadavg", lambda: (0.1, 0.1, 0.1))


def test_other_share_is_machine_cpu_time_minus_our_own(monkeypatch):
    import bench.quiet as quiet

    machine = _Machine()
    _patch(monkeypatch, machine, others_before=0.0)
    with LoadWatch(cores=2) as watch:
        machine.run(2.0, others=0.5, ours=2.5)  # 2 s on 2 cores = 4 CPU seconds; others took 0.5
    assert watch.other_share_before == 0.0
    assert watch.other_share == 0.5 / 4 and watch.quiet is False  # 12.5% > 10%

    # the measurement itself alone, but another job ran until it started: not quiet either
    machine = _Machine()
    _patch(monkeypatch, machine, others_before=0.5)  # half a core busy in the settling window
    with LoadWatch(cores=2) as watch:
        machine.run(2.0, others=0.0, ours=2.0)
    assert watch.other_share == 0.0 and watch.other_share_before == 0.25 and watch.quiet is False

    # without /proc/stat the share is unknown, and so is quietness: no verdict
    monkeypatch.setattr(quiet, "_busy_seconds", lambda: None)
    with LoadWatch(cores=2) as unknown:
        pass
    assert unknown.other_share is None and unknown.quiet is None and verdict(True, unknown) == NOISY


def test_real_watch_reads_proc_stat():
    with LoadWatch() as watch:
        time.sleep(0.05)
    assert watch.other_share is not None and watch.other_share >= 0 and watch.load_after is not None


def test_a_live_child_such_as_a_server_under_test_counts_as_our_own_cpu_time():
    """A serving benchmark's servers run as live children while it measures them: their CPU time is
    the benchmark's, so it must not make the machine look busy (bench/results/serve.md once had no
    verdict for that reason). A real child process spins for 1.5 s of CPU while we wait."""
    import subprocess
    import sys

    import bench.quiet as quiet

    before, before_live = quiet._own_cpu_seconds(), quiet._live_descendants_cpu_seconds(quiet.os.getpid())
    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nend = time.process_time() + 1.5\nwhile time.process_time() < end: pass\n"
                              "time.sleep(30)"])
    try:
        deadline = time.monotonic() + 30
        # other live children of this process (a test session's shared servers) are in both readings
        while (quiet._live_descendants_cpu_seconds(quiet.os.getpid()) - before_live < 1.4
               and time.monotonic() < deadline):
            time.sleep(0.2)
        assert child.poll() is None  # still alive: not yet in RUSAGE_CHILDREN
        assert quiet._own_cpu_seconds() - before >= 1.4
    finally:
        child.kill()
        child.wait(timeout=10)
