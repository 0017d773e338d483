"""Guards that run inside every training rank: hang watchdog, straggler scores, loss guard, budget.

- ``Watchdog``: a daemon thread per rank. The loop calls ``beat(step)`` after every step; the
  thread writes a heartbeat file (``<stage>/heartbeats/rank-N.json``) about once a second and,
  when no step finished for longer than the timeout, records ``hang_detected`` in events.jsonl
  and ends the process with ``HANG_EXIT_CODE`` so torchrun restarts the attempt. The timeout is
  either fixed or derived from the observed step times, as nvidia-resiliency-ext's
  timeouts_calc.py does: ``max(min_timeout, factor x the slowest step seen)`` once a few steps
  were seen, and the long start-up timeout before that and during checkpoints and validation.
- ``SectionTimer`` + ``straggler_scores``: per-rank section times (data, forward/backward,
  optimizer). On CPU a section is measured in process CPU seconds, so time spent waiting in a
  gloo collective for a slower rank is not charged to the waiting rank (measured: a 2 s wait in
  all_reduce costs 5 ms of CPU). On CUDA a wall time would charge a fast rank's wait inside an
  FSDP collective to its own forward/backward and even out the scores, so there the profiler
  records the CPU ops and the GPU kernels they launch (CUPTI's device timestamps, the clock
  ``torch.cuda.Event`` timing reads) and a section is the device time of the compute kernels
  its ops launched; NCCL kernels, which on a fast rank spin until the slow rank arrives, are
  added up apart as the section's collective wait. Scores follow
  nvidia-resiliency-ext's straggler detector: relative score = reference ÷ rank's time, the
  reference being the fastest rank's median; individual score = rank's best ÷ rank's current.
  A score under the threshold (0.75) names a straggler.
- ``LossGuard``: a non-finite loss, or one above ``factor x`` the running median, is bad.
- ``budget_spent``: elapsed wall hours × ranks against the plan's device-hour budget.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from gonogo.events import write_event

log = logging.getLogger(__name__)

HANG_EXIT_CODE = 86          # distinctive: "the watchdog ended this rank"
SECTIONS = ("data", "forward_backward", "optimizer")
STRAGGLER_THRESHOLD = 0.75


# -- hang watchdog ---------------------------------------------------------------------------------

class Watchdog:
    """Ends this rank when it stops making progress (see the module doc)."""

    def __init__(self, *, rank: int, stage: str, stage_dir: Path, events_path: Path, timeout_s: float,
                 min_timeout_s: float, factor: float, startup_timeout_s: float, warmup_steps: int = 3,
                 exit=os._exit):
        self.rank, self.stage = rank, stage
        self.heartbeat_path = Path(stage_dir) / "heartbeats" / f"rank-{rank:05d}.json"
        self.events_path = Path(events_path)
        self.fixed_timeout_s = timeout_s
        self.min_timeout_s = min_timeout_s
        self.factor = factor
        self.startup_timeout_s = startup_timeout_s
        self.warmup_steps = warmup_steps
        self._exit = exit
        self._lock = threading.Lock()
        self._last_progress = time.monotonic()
        self._step = 0
        self._slowest_step_s = 0.0
        self._steps_seen = 0
        self._long_phases = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.fired = False
        self.on_fire = None  # called (step, idle seconds) before the rank exits: the triage bundle

    def timeout_s(self) -> float:
        """The current limit on the time without progress."""
        with self._lock:
            if self._long_phases or self._steps_seen < self.warmup_steps:
                return max(self.startup_timeout_s, self.fixed_timeout_s)
            if self.fixed_timeout_s > 0:
                return self.fixed_timeout_s
            return max(self.min_timeout_s, self.factor * self._slowest_step_s)

    def state(self) -> dict[str, Any]:
        """The last step that finished, when (wall time), and the time since then."""
        with self._lock:
            idle = time.monotonic() - self._last_progress
            return {"step": self._step, "last_progress_time": time.time() - idle,
                    "seconds_without_progress": round(idle, 3)}

    def beat(self, step: int, step_seconds: Optional[float] = None) -> None:
        with self._lock:
            self._last_progress = time.monotonic()
            self._step = step
            if step_seconds is not None:
                self._steps_seen += 1
                # the first steps (allocation, warm caches) do not count toward the derived timeout
                if self._steps_seen > 1:
                    self._slowest_step_s = max(self._slowest_step_s, step_seconds)

    @contextlib.contextmanager
    def long_phase(self) -> Iterator[None]:
        """Checkpoint saves, validation, rollbacks: the start-up timeout applies meanwhile."""
        with self._lock:
            self._long_phases += 1
            self._last_progress = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._long_phases -= 1
                self._last_progress = time.monotonic()

    def start(self) -> "Watchdog":
        self.heartbeat_path.parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._watch, name="gonogo-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def check(self) -> Optional[float]:
        """Seconds without progress when over the timeout, else None."""
        with self._lock:
            idle = time.monotonic() - self._last_progress
        return idle if idle > self.timeout_s() else None

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                step = self._step
            try:
                tmp = self.heartbeat_path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"rank": self.rank, "step": step, "time": time.time(),
                                           "pid": os.getpid()}))
                os.replace(tmp, self.heartbeat_path)
            except OSError:
                pass  # a heartbeat file is informative; a full disk must not kill the rank
            idle = self.check()
            if idle is not None:
                self._fire(step, idle)
                return

    def _fire(self, step: int, idle: float) -> None:
        self.fired = True
        timeout = self.timeout_s()
        log.error("watchdog: rank %d made no progress for %.1f s (timeout %.1f s) after step %d; ending "
                  "this attempt so torchrun restarts it", self.rank, idle, timeout, step)
        write_event(self.events_path, self.stage, rank=self.rank, step=step, event="hang_detected",
                    seconds_without_progress=round(idle, 3), timeout_s=round(timeout, 3))
        if self.on_fire is not None:
            self.on_fire(step, idle)
        self._exit(HANG_EXIT_CODE)


# -- straggler detection -----------------------------------------------------------------------------

SECTION_PREFIX = "gonogo.section."


def _kernel_profiler():
    """A profiler of the CPU ops (to know which section launched a kernel) and the GPU kernels;
    no shapes, stacks or memory, which are what make profiling expensive."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    return torch.profiler.profile(activities=activities)


def split_kernel_time(events: Sequence[Any]) -> dict[str, list[float]]:
    """Per section, [compute seconds, collective seconds] of the kernels launched inside it.

    ``events`` are the profiler's FunctionEvents: the sections are the ``record_function``
    ranges named ``SECTION_PREFIX + name``; every op that launched kernels (on any thread: the
    backward runs on autograd's own) belongs to the section whose range holds its start. A
    kernel's ``duration`` is device time, so a compute kernel costs the same however long the
    stream waited before it; NCCL kernels are the collective wait.
    """
    # the CPU-side ranges: with CUDA activity the profiler also lists each range on the GPU's timeline
    ranges = [(event.name[len(SECTION_PREFIX):], event.time_range.start, event.time_range.end)
              for event in events if event.name.startswith(SECTION_PREFIX) and _on_cpu(event)]
    split: dict[str, list[float]] = {}
    for event in events:
        kernels = getattr(event, "kernels", None)
        if not kernels or event.name.startswith(SECTION_PREFIX):
            continue
        start = event.time_range.start
        owner = next((name for name, first, last in ranges if first <= start <= last), None)
        if owner is None:
            continue  # launched between sections (logging, checkpoints): not a step's work
        totals = split.setdefault(owner, [0.0, 0.0])
        for kernel in kernels:
            totals["nccl" in kernel.name.lower()] += kernel.duration / 1e6  # microseconds
    return split


def _on_cpu(event: Any) -> bool:
    device_type = getattr(event, "device_type", None)
    return device_type is None or getattr(device_type, "name", str(device_type)).upper().endswith("CPU")


class SectionTimer:
    """This rank's time per section since the last ``take()``.

    CPU: process CPU seconds of every step. CUDA: device seconds of the compute kernels of the
    first step of each window (the steps between two ``take()`` calls), read from a profiler that
    records that one step only (``profiler_factory`` makes one; tests pass a fake), so the
    profiling costs one step per window, not a share of every step; ``collective_means`` holds
    the NCCL kernels' time of the same step, apart.
    """

    def __init__(self, device_type: str, profiler_factory: Optional[Any] = None):
        self.device_type = device_type
        self.seconds = {name: 0.0 for name in SECTIONS}
        self.collective_seconds = {name: 0.0 for name in SECTIONS}
        self.steps = 0
        self.last_seconds = 0.0  # the length of the section that ended last
        self.collective_means: list[float] = [0.0] * len(SECTIONS)  # of the last take(), CUDA only
        self._cuda = device_type == "cuda"
        self._profiler: Optional[Any] = None
        self._profiled_steps = 0
        if self._cuda:
            self._profiler_factory = profiler_factory or _kernel_profiler
            self._start_profiler()

    def _start_profiler(self) -> None:
        self._profiler = self._profiler_factory()
        self._profiler.start()
        self._profiled_from = self.steps

    def _now(self) -> float:
        # on CUDA only the length of the last section (the straggler drill's yardstick) is a wall time
        return time.perf_counter() if self._cuda else time.process_time()

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        if self._profiler is not None and self.steps > self._profiled_from:
            self._read_profiler()  # the profiled step is over: the rest of the window runs unobserved
        started = self._now()
        try:
            if self._profiler is not None:
                import torch

                with torch.profiler.record_function(SECTION_PREFIX + name):
                    yield
            else:
                yield
        finally:
            self.last_seconds = self._now() - started
            if not self._cuda:
                self.seconds[name] += self.last_seconds

    def _read_profiler(self) -> None:
        assert self._profiler is not None  # both callers check
        self._profiler.stop()
        for name, (compute, collective) in split_kernel_time(self._profiler.events()).items():
            if name in self.seconds:
                self.seconds[name] += compute
                self.collective_seconds[name] += collective
        self._profiled_steps = max(1, self.steps - self._profiled_from)
        self._profiler = None

    def close(self) -> None:
        """Stop a profiler still recording (CUDA): a process that exits with one running can crash
        in the profiler's teardown (seen: SIGSEGV at interpreter exit)."""
        if self._profiler is not None:
            self._profiler.stop()
            self._profiler = None

    def take(self) -> list[float]:
        """Mean seconds per step of each section (SECTIONS order), then reset."""
        if self._profiler is not None:
            self._read_profiler()
        steps = self._profiled_steps if self._cuda else max(1, self.steps)
        means = [self.seconds[name] / steps for name in SECTIONS]
        self.collective_means = [self.collective_seconds[name] / steps for name in SECTIONS]
        self.seconds = {name: 0.0 for name in SECTIONS}
        self.collective_seconds = {name: 0.0 for name in SECTIONS}
        self.steps = 0
        if self._cuda:
            self._start_profiler()
        return means


def straggler_scores(times: Sequence[Sequence[float]], best: Sequence[float],
                     threshold: float = STRAGGLER_THRESHOLD, floor_s: float = 1e-3) -> dict[str, Any]:
    """Scores of one gathering: ``times[rank][section]`` (SECTIONS order, seconds per step) and
    each rank's best total so far.

    A section a rank spends less than ``floor_s`` (or 10 % of the median step) in is scored 1.0:
    at those sizes timer noise, not the rank, decides the ratio, and even a section twice as slow
    would not slow the step by much.
    """
    ranks = len(times)
    totals = [sum(row) for row in times]
    floor = max(floor_s, 0.1 * statistics.median(totals))
    relative: dict[str, list[float]] = {}
    for index, name in enumerate(SECTIONS + ("total",)):
        column = [row[index] if index < len(SECTIONS) else totals[r] for r, row in enumerate(times)]
        reference = min(column)
        relative[name] = [1.0 if value < floor else round(min(1.0, max(reference, floor) / value), 4)
                          for value in column]
    individual = [round(min(1.0, best[r] / totals[r]), 4) if totals[r] > 0 else 1.0 for r in range(ranks)]
    stragglers = sorted({r for scores in relative.values() for r, s in enumerate(scores) if s < threshold})
    slow_sections = {r: [name for name, scores in relative.items() if scores[r] < threshold] for r in stragglers}
    return {"relative": relative, "individual": individual, "straggler_ranks": stragglers,
            "slow_sections": slow_sections, "min_relative_score": min(min(s) for s in relative.values())}


class StragglerDetector:
    """Gathers every rank's section times (one small all_gather) and scores them."""

    def __init__(self, world_size: int, device, threshold: float = STRAGGLER_THRESHOLD):
        self.world_size = world_size
        self.device = device
        self.threshold = threshold
        self.best = [float("inf")] * world_size
        self.straggler_ranks: set[int] = set()
        self.min_relative_score: Optional[float] = None
        self.reports: list[dict[str, Any]] = []
        self.gatherings = 0

    def gather(self, timer: SectionTimer) -> dict[str, Any]:
        import torch
        import torch.distributed as dist

        mine = torch.tensor(timer.take(), dtype=torch.float64, device=self.device)
        rows = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(rows, mine)
        times = [row.tolist() for row in rows]
        for rank, row in enumerate(times):
            self.best[rank] = min(self.best[rank], sum(row))
        report = straggler_scores(times, self.best, self.threshold)
        report["times"] = times
        if timer.device_type == "cuda":
            report["collective_wait_s"] = timer.collective_means  # this rank's, kept out of the scores
        self.gatherings += 1
        if self.gatherings == 1:
            # the first window of an attempt holds the warm-up steps (allocation, cold caches)
            report["warmup"] = True
            return report
        self.straggler_ranks.update(report["straggler_ranks"])
        low = report["min_relative_score"]
        self.min_relative_score = low if self.min_relative_score is None else min(self.min_relative_score, low)
        self.reports.append(report)
        return report


# -- loss and budget -----------------------------------------------------------------------------

class LossGuard:
    """A non-finite loss, or a spike above ``factor`` x the running median of the good ones."""

    def __init__(self, factor: float, window: int = 20, warmup: int = 10):
        self.factor = factor
        self.warmup = warmup
        self.history: deque[float] = deque(maxlen=window)

    def check(self, loss: float) -> Optional[str]:
        """Why ``loss`` is bad, or None (then it joins the running median)."""
        if loss != loss or loss in (float("inf"), float("-inf")):
            return f"loss is {loss}"
        if self.factor > 0 and len(self.history) >= self.warmup:
            median = statistics.median(self.history)
            if loss > self.factor * median:
                return f"loss spike {loss:.4g} > {self.factor:g} x running median {median:.4g}"
        self.history.append(loss)
        return None


def budget_spent(started: Optional[float], world_size: int, budget_hours: Optional[float],
                 now: Optional[float] = None) -> bool:
    """Whether the stage's wall time since ``started`` (time.time(), when the stage began, so
    restarted attempts count too) × ranks used up the device hours left to the plan."""
    if budget_hours is None or started is None:
        return False
    elapsed = (time.time() if now is None else now) - started
    return elapsed * world_size / 3600.0 >= budget_hours


# -- helpers of the loop's recovery ------------------------------------------------------------------

def has_committed(root: Path) -> bool:
    from gonogo.checkpoints import manifest

    return any(manifest.is_committed(path) for _, path in manifest.step_dirs(root))
