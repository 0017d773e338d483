"""Out-of-memory behaviour: a memory cap on CPU, a clean stop on OOM, and the largest micro-batch that fits.

- **The cap on CPU** (``train.memory_cap_GB``): a GPU has a hard memory limit that raises
  ``torch.OutOfMemoryError``; a CPU rank has none short of the kernel's OOM killer. The cap plays
  the GPU's part so the same path runs here: after every step each rank reads its peak resident
  memory (``VmHWM`` in /proc/self/status, the high-water mark the kernel keeps, so the peak
  inside backward counts) and a peak over the cap raises ``MemoryCapExceeded``. It measures
  what a container memory limit (cgroup ``memory.max``) would kill on, it costs one small file
  read per step, and unlike ``RLIMIT_AS`` it does not trip on the address space torch and its
  libraries reserve without using. It cannot stop an allocation before it happens: the
  memory is used, then the rank stops.
- **An OOM during training** (``torch.OutOfMemoryError`` on CUDA, the cap on CPU) is caught in
  the worker of the rank where it happened (``handle_oom``): it writes ``oom-rank-N.json`` in
  the stage folder (the memory it needed, the limit, the settings), stops torchrun's agent
  (an OOM repeats on every restart, so restarting only burns time), and exits with
  ``OOM_EXIT_CODE``. The agent then stops the other ranks, which are waiting in a collective for
  this one, within its shutdown time. The parent turns the record into one line (``oom_message``).
- **The memory probe** (``gonogo train --find-max-batch``, stage kind ``memory``, in
  gonogo.train.memory_probe and gonogo.stages.memory.stage): one torchrun
  launch with the job's ranks (so FSDP's sharding counts) tries micro-batch sizes on the real
  model and optimizer, a few full steps each on random tokens: 1, 2, 4, ... until one does not
  fit, then bisection between the last fit and the first failure; bounded in trials and size.
  Between trials the peak is reset (``/proc/self/clear_refs`` on CPU after ``malloc_trim`` gives
  freed heap back; ``reset_peak_memory_stats`` on CUDA).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

OOM_EXIT_CODE = 87      # distinctive: "this rank ran out of memory"
GB = 1e9
RESULT_NAME = "memory.json"


class MemoryCapExceeded(RuntimeError):
    """A CPU rank's peak resident memory went over ``train.memory_cap_GB``."""

    def __init__(self, needed_bytes: int, cap_bytes: int, step: Optional[int] = None):
        self.needed_bytes, self.cap_bytes, self.step = needed_bytes, cap_bytes, step
        super().__init__(f"peak resident memory {needed_bytes / GB:.2f} GB is over the cap "
                         f"train.memory_cap_GB={cap_bytes / GB:g}")


def _status_kb(field: str) -> Optional[int]:
    try:
        text = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def peak_rss_bytes() -> Optional[int]:
    """This process's peak resident memory since start or the last ``reset_peak`` (None: unreadable)."""
    return _status_kb("VmHWM")


def reset_peak() -> bool:
    """Give freed heap back to the kernel and restart the peak at the current resident size."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the peak may keep freed heap the allocator holds
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class MemoryGuard:
    """The CPU cap, checked after every step (a no-op without a cap or on CUDA, whose allocator raises)."""

    def __init__(self, device_type: str, cap_GB: Optional[float]):
        self.cap_bytes = int(cap_GB * GB) if cap_GB and device_type == "cpu" else None

    def check(self, step: Optional[int] = None) -> None:
        if self.cap_bytes is None:
            return
        peak = peak_rss_bytes()
        if peak is not None and peak > self.cap_bytes:
            raise MemoryCapExceeded(peak, self.cap_bytes, step)


def is_oom(error: BaseException) -> bool:
    if isinstance(error, MemoryCapExceeded):
        return True
    import torch

    return isinstance(error, torch.OutOfMemoryError)


def oom_record(error: BaseException, *, rank: int, device_type: str, micro_batch_size: int) -> dict[str, Any]:
    """What the rank needed and what it had, in bytes (None where it cannot be known)."""
    record: dict[str, Any] = {"rank": rank, "time": time.time(), "device": device_type,
                              "micro_batch_size": micro_batch_size, "error": str(error).splitlines()[0][:500]}
    if isinstance(error, MemoryCapExceeded):
        record.update(needed_bytes=error.needed_bytes, limit_bytes=error.cap_bytes, limit_setting="train.memory_cap_GB",
                      step=error.step)
        return record
    import torch

    asked = re.search(r"Tried to allocate ([\d.]+) (GiB|MiB|KiB|B)", str(error))
    asked_bytes = (float(asked.group(1)) * {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "B": 1}[asked.group(2)]
                   if asked else None)
    reserved = limit = None
    if torch.cuda.is_available():
        try:
            reserved = torch.cuda.memory_reserved()
            limit = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        except RuntimeError:
            pass
    record.update(needed_bytes=int(reserved + asked_bytes) if reserved is not None and asked_bytes else None,
                  asked_bytes=asked_bytes, reserved_bytes=reserved, limit_bytes=limit,
                  limit_setting="the GPU's memory")
    return record


def handle_oom(error: BaseException, *, stage_dir: Path, rank: int, device_type: str, micro_batch_size: int,
               exit=os._exit) -> None:
    """Record the OOM, stop torchrun's agent (no restart: it would run out again), end this rank."""
    from gonogo.rundir import write_json_atomic

    record = oom_record(error, rank=rank, device_type=device_type, micro_batch_size=micro_batch_size)
    try:
        write_json_atomic(Path(stage_dir) / f"oom-rank-{rank:05d}.json", record)
    except OSError as failure:
        log.error("could not write the OOM record: %s", failure)
    log.error("rank %d: out of memory: %s", rank, record["error"])
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        try:
            os.kill(os.getppid(), signal.SIGTERM)  # the agent stops every rank and does not restart
        except OSError:
            pass
    sys.stderr.flush()
    exit(OOM_EXIT_CODE)


def clear_records(stage_dir: Path) -> None:
    for path in Path(stage_dir).glob("oom-rank-*.json"):
        path.unlink(missing_ok=True)


def oom_message(stage_dir: Path, stage: str) -> Optional[str]:
    """One line from the ranks' OOM records (the first rank's), or None when there are none."""
    records = []
    for path in sorted(Path(stage_dir).glob("oom-rank-*.json")):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    if not records:
        return None
    first = min(records, key=lambda record: record.get("time", 0))
    ranks = ", ".join(str(record["rank"]) for record in sorted(records, key=lambda r: r["rank"]))
    needed = first.get("needed_bytes")
    limit = first.get("limit_bytes")
    need_text = f"needed {needed / GB:.2f} GB" if needed else "needed more than was free"
    limit_text = f" of {limit / GB:.2f} GB ({first.get('limit_setting')})" if limit else ""
    at_step = f" at step {first['step']}" if first.get("step") is not None else ""
    fix = (f"lower train.micro_batch_size (now {first.get('micro_batch_size')}; `gonogo train --find-max-batch` "
           f"finds the largest that fits)")
    if first.get("limit_setting") == "train.memory_cap_GB":
        fix += " or raise train.memory_cap_GB"
    return f"{stage}: out of memory on rank(s) {ranks}{at_step}: {need_text}{limit_text}; {fix}"


# -- the memory probe ----------------------------------------------------------------------------------

def next_size(largest: Optional[int], failing: Optional[int], max_size: int) -> Optional[int]:
    """The next micro-batch to try: doubling until one fails (or ``max_size``), then bisection; None: done."""
    if failing is None:
        if largest is None:
            return 1
        return None if largest >= max_size else min(largest * 2, max_size)
    low = largest or 0
    return None if failing - low <= 1 else (low + failing) // 2


def search_sizes(fits, *, max_size: int, max_trials: int, largest: Optional[int] = None,
                 failing: Optional[int] = None, trials: Optional[list] = None,
                 stop_on_failure: bool = False) -> dict[str, Any]:
    """Run the search with ``fits(size)`` answering one trial, from a known ``largest`` fit and
    ``failing`` size; with ``stop_on_failure`` it returns after the first size that does not fit
    (the caller continues in a fresh process, see ``find_max_batch``). Bounded by ``max_trials``."""
    trials = list(trials or [])
    while len(trials) < max_trials:
        size = next_size(largest, failing, max_size)
        if size is None:
            break
        outcome = fits(size)
        trials.append({"micro_batch_size": size, **outcome})
        if outcome["fits"]:
            largest = size
        else:
            failing = size
            if stop_on_failure:
                break
    done = next_size(largest, failing, max_size) is None
    bounded_by = ("max_micro_batch" if largest is not None and largest >= max_size
                  else None if done else "max_trials")
    return {"max_micro_batch_size": largest, "smallest_failing": failing, "trials": trials,
            "bounded_by": bounded_by, "done": done or len(trials) >= max_trials}


def recommended(max_size: Optional[int], global_batch_size: int, world_size: int) -> Optional[int]:
    """The largest micro-batch that fits and divides the per-rank batch (what check_world accepts)."""
    if not max_size:
        return None
    per_rank = global_batch_size // world_size
    return max((size for size in range(1, min(max_size, per_rank) + 1) if per_rank % size == 0), default=None)
