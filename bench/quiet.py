"""Whether a benchmark ran on a quiet machine, so that its result files may call a target met.

A benchmark measured while other jobs hold the cores says more about the other jobs than about
the code (bench/results/pretrain.md once saw one configuration move 6.7x between two rounds). So
every measurement runs inside a ``LoadWatch``, which records the load average before and after
and, from /proc/stat and the CPU time of the benchmark's whole process tree (finished children
and live ones such as the servers it measures, read from /proc/<pid>/stat), the share of the
machine's CPU time that *other* processes used meanwhile. A target's verdict is "met" or
"NOT met" only when the machine was quiet; otherwise it is "noisy: no verdict".

Quiet means: other processes used at most ``OTHER_SHARE`` of the machine's CPU time in the
``SETTLE_SECONDS`` just before the measurement and during it. The 1-minute load average before
is recorded beside it, and judged only where no share could be read: it is an average over the
last minute that includes the benchmark's own previous run, so a benchmark that runs its
configurations one after the other never saw it fall below the threshold between two of them
(bench/pretrain.py, 2026-12-02: load 1.3-1.5 before every run while other processes used 0%).
Where /proc/stat cannot be read (macOS) the other processes' share is unknown, and so is quiet.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from dataclasses import dataclass, field
from typing import Optional

LOAD_PER_CORE = 0.5
OTHER_SHARE = 0.10
SETTLE_SECONDS = 2.0  # the window just before a measurement in which others must be idle too
NOISY = "noisy: no verdict"


def _busy_seconds() -> Optional[float]:
    """CPU seconds every CPU of the machine has spent not idle since boot (None without /proc)."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal: steal is time another VM took from us
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _live_descendants_cpu_seconds(root: int) -> float:
    """CPU seconds of ``root``'s live descendants (servers under test, torchrun workers still
    running): each one's own time and that of the children it reaped. 0 without /proc."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0.0
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                text = stat.read()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'
        fields = text.rpartition(")")[2].split()
        if len(fields) < 15:
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = sum(int(value) for value in fields[11:15]) / tick  # utime stime cutime cstime
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    total, stack = 0.0, list(children.get(root, []))
    while stack:
        pid = stack.pop()
        total += times.get(pid, 0.0)
        stack.extend(children.get(pid, []))
    return total


def _own_cpu_seconds() -> float:
    """This process's CPU time and its whole process tree's: finished children (reaped, with what
    they reaped) and live descendants, e.g. the servers a serving benchmark started."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
            + _live_descendants_cpu_seconds(os.getpid()))


@dataclass
class LoadWatch:
    """``with LoadWatch() as watch: ...`` then ``watch.quiet``, ``watch.describe()``."""

    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: Optional[tuple[float, float, float]] = None
    other_share: Optional[float] = None  # share of the machine's CPU time used by other processes
    other_share_before: Optional[float] = None  # the same, in the SETTLE_SECONDS before
    seconds: Optional[float] = None
    settle_seconds: float = SETTLE_SECONDS

    def __enter__(self) -> "LoadWatch":
        self.load_before = os.getloadavg()
        busy, own, started = _busy_seconds(), _own_cpu_seconds(), time.monotonic()
        if self.settle_seconds > 0:
            time.sleep(self.settle_seconds)
        self._busy, self._own, self._started = _busy_seconds(), _own_cpu_seconds(), time.monotonic()
        self.other_share_before = self._others(busy, own, started)
        return self

    def _others(self, busy: Optional[float], own: float, started: float) -> Optional[float]:
        """The share of the machine's CPU time other processes used since (busy, own, started)."""
        now_busy, now_own, seconds = _busy_seconds(), _own_cpu_seconds(), time.monotonic() - started
        if busy is None or now_busy is None or seconds <= 0:
            return None
        return max(0.0, (now_busy - busy) - (now_own - own)) / (seconds * self.cores)

    def __exit__(self, *exc) -> None:
        self.seconds = time.monotonic() - self._started
        self.other_share = self._others(self._busy, self._own, self._started)
        self.load_after = os.getloadavg()

    @property
    def quiet(self) -> Optional[bool]:
        """True/False once the watch ended; None when the other processes' share is unknown."""
        if self.other_share is None:
            return False if self.load_before[0] > LOAD_PER_CORE * self.cores else None
        before = self.other_share_before
        return self.other_share <= OTHER_SHARE and (before is None or before <= OTHER_SHARE)

    def describe(self) -> str:
        after = "?" if self.load_after is None else f"{self.load_after[0]:.1f}"
        share = "unknown" if self.other_share is None else f"{self.other_share:.0%}"
        if self.other_share_before is not None:
            share += f" ({self.other_share_before:.0%} in the {self.settle_seconds:g} s before)"
        state = {True: "quiet", False: "busy", None: "unknown"}[self.quiet]
        return (f"load average (1 min) before / after {self.load_before[0]:.1f} / {after} on {self.cores} cores, "
                f"other processes used {share} of the CPU time: {state}")


def verdict(ok: bool, *watches: LoadWatch) -> str:
    """"met" / "NOT met" when every measurement behind it ran on a quiet machine, else NOISY."""
    if watches and all(watch.quiet is True for watch in watches):
        return "met" if ok else "NOT met"
    return NOISY


def machine() -> str:
    """One line naming the machine a result file was measured on."""
    import torch

    from gonogo.train.peak import cpu_model

    cpu = cpu_model()
    gpus = ""
    if torch.cuda.is_available():
        gpus = f", {torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} cores{gpus}, {platform.system()} {platform.release()}, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


RULE = (f"A target is called met or NOT met only from measurements on a quiet machine (other processes "
        f"using at most {OTHER_SHARE:.0%} of the CPU time in the {SETTLE_SECONDS:g} s before the "
        f"measurement and during it, read from /proc/stat; the 1-minute load average, which includes "
        f"the benchmark's own previous run, is shown and judged only where /proc/stat cannot be read, "
        f"at most {LOAD_PER_CORE} per core); otherwise it says \"{NOISY}\".")
