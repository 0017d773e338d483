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
- **The memory probe** (``gonogo train --find-max-batch``, stage kind ``memory``): one torchrun
  launch with the job's ranks (so FSDP's sharding counts) tries micro-batch sizes on the real
  model and optimizer, a few full steps each on random tokens: 1, 2, 4, ... until one does not
  fit, then bisection between the last fit and the first failure; bounded in trials and size.
  Between trials the peak is reset (``/proc/self/clear_refs`` on CPU after ``malloc_trim`` gives
  freed heap back; ``reset_peak_memory_stats`` on CUDA).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
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


def _probe(job, world, probe: dict[str, Any]) -> Optional[dict[str, Any]]:
    import torch
    import torch.distributed as dist

    from gonogo.train.loop import build_model, build_optimizer, language_model_loss
    from gonogo.parallel import autocast, build_meshes

    config, settings = job.config, job.config.train
    build_meshes(world, settings.expert_parallel)
    model = build_model(config.model, config, world)
    optimizer = build_optimizer(model, settings, world)
    cuda = world.device.type == "cuda"
    cap = int(settings.memory_cap_GB * GB) if settings.memory_cap_GB and not cuda else None
    limit = (torch.cuda.get_device_properties(world.device).total_memory if cuda else cap)

    def fits(size: int) -> dict[str, Any]:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak()
        started = time.perf_counter()
        oom = False
        try:
            for _ in range(probe["trial_steps"]):
                tokens = torch.randint(0, config.model.vocab_size, (size, settings.seq_len + 1), device=world.device)
                with autocast(config, world):
                    logits = model(tokens[:, :-1])
                language_model_loss(logits, tokens[:, 1:]).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                del logits, tokens
        except torch.OutOfMemoryError:
            oom = True
            optimizer.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
        over = oom or (cap is not None and peak is not None and peak > cap)
        agreed = torch.tensor([float(over), float(peak or 0)], dtype=torch.float64, device=world.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)  # every rank takes the same branch of the search
        outcome = {"fits": not bool(agreed[0]), "peak_GB": round(float(agreed[1]) / GB, 4) if peak else None,
                   "oom": oom, "seconds": round(time.perf_counter() - started, 3)}
        if world.rank == 0:
            log.info("memory probe: micro_batch_size=%d %s (peak %s GB)", size,
                     "fits" if outcome["fits"] else "does not fit", outcome["peak_GB"])
        return outcome

    result = search_sizes(fits, max_size=probe["max_micro_batch"], max_trials=probe["max_trials"],
                          largest=probe.get("largest"), failing=probe.get("failing"), trials=probe.get("trials"),
                          stop_on_failure=True)
    result.update({"device": world.device.type, "world_size": world.world_size, "seq_len": settings.seq_len,
                   "limit_GB": round(limit / GB, 4) if limit else None,
                   "limit_setting": "the GPU's memory" if cuda else ("train.memory_cap_GB" if cap else None),
                   "recommended_micro_batch_size": recommended(result["max_micro_batch_size"],
                                                               settings.global_batch_size, world.world_size),
                   "global_batch_size": settings.global_batch_size})
    at_max = [t for t in result["trials"] if t["micro_batch_size"] == result["max_micro_batch_size"]]
    result["peak_GB_at_max"] = at_max[0]["peak_GB"] if at_max else None
    return result if world.rank == 0 else None


def probe_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gonogo.train.memory")
    parser.add_argument("job", type=Path)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    import torch.distributed as dist

    from gonogo.rundir import write_json_atomic
    from gonogo.parallel import init_distributed
    from gonogo.train.worker import read_job

    job = read_job(args.job)
    probe = json.loads(args.job.read_text(encoding="utf-8"))["probe"]
    world = init_distributed(job.config.train.init_timeout_s)
    try:
        result = _probe(job, world, probe)
        if result is not None:
            write_json_atomic(job.stage_dir / RESULT_NAME, result)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def find_max_batch(config, config_filename: str, nproc: int, *, run_dir: Path, stage_dir: Path, timeout_s: float,
                   run_command, max_micro_batch: int = 1024, max_trials: int = 16,
                   trial_steps: int = 2) -> dict[str, Any]:
    """Run the probe under torchrun (no restarts) and return rank 0's result."""
    from gonogo.cluster.torchrun import torchrun_command, torchrun_env
    from gonogo.errors import StageFailed, UserError
    from gonogo.rundir import write_json_atomic
    from gonogo.train.config import check_world
    from gonogo.train.worker import write_job

    if max_micro_batch < 1 or max_trials < 1 or trial_steps < 1:
        raise UserError(f"memory probe: max_micro_batch={max_micro_batch}, max_trials={max_trials} and "
                        f"trial_steps={trial_steps} must all be >= 1")
    check_world(config, nproc)
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    job_path = stage_dir / "memory-job.json"
    write_job(job_path, config=config, config_filename=config_filename, run_dir=run_dir, stage="memory",
              stage_dir=stage_dir, resume="never")
    data = json.loads(job_path.read_text(encoding="utf-8"))
    argv = torchrun_command("gonogo.train.memory", [str(job_path)], nproc, max_restarts=0)
    extra = {} if "OMP_NUM_THREADS" in os.environ else {
        "OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // nproc))}
    # a fixed mmap threshold: glibc otherwise raises it after large frees and keeps the next trials'
    # tensors on its heap, whose freed pages stay resident and inflate the smaller trials' peaks
    extra.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    # sizes only grow inside one launch; after a size that did not fit, the search goes on in fresh
    # processes, so memory a failed trial left resident never counts against a smaller one
    result_path = stage_dir / RESULT_NAME
    result: dict[str, Any] = {"max_micro_batch_size": None, "smallest_failing": None, "trials": []}
    deadline = time.monotonic() + timeout_s
    for launch in range(max_trials):
        data["probe"] = {"max_micro_batch": max_micro_batch, "max_trials": max_trials, "trial_steps": trial_steps,
                         "largest": result["max_micro_batch_size"], "failing": result["smallest_failing"],
                         "trials": result["trials"]}
        write_json_atomic(job_path, data)
        result_path.unlink(missing_ok=True)
        left = deadline - time.monotonic()
        if left <= 0:
            raise StageFailed(f"memory probe: did not finish within {timeout_s:.0f} s ({len(result['trials'])} trials)")
        code = run_command(argv, timeout=left, log_name=f"memory-{launch + 1}.log", env=torchrun_env(extra))
        if code != 0 or not result_path.is_file():
            raise StageFailed(f"memory probe: workers exited with code {code} "
                              f"(log: {stage_dir / f'memory-{launch + 1}.log'})")
        result = json.loads(result_path.read_text(encoding="utf-8"))
        result["launches"] = launch + 1
        if result["done"]:
            break
    write_json_atomic(result_path, result)
    return result


if __name__ == "__main__":
    raise SystemExit(probe_main())


# -- the stage kind `memory` and `gonogo train --find-max-batch` ----------------------------------------

def _stage_parts():
    from pydantic import Field

    from gonogo.stages.base import StageSettings

    class MemorySettings(StageSettings):
        config: str = "tiny-dense"                  # a preset word or a TOML path (relative to the plan)
        nproc: int = Field(default=1, ge=1)
        overrides: list[str] = Field(default_factory=list)
        max_micro_batch: int = Field(default=1024, ge=1)
        max_trials: int = Field(default=16, ge=1)
        trial_steps: int = Field(default=2, ge=1)   # the first step allocates the optimizer state
        timeout_s: float = Field(default=1800.0, gt=0)

    return MemorySettings


MemorySettings = _stage_parts()
STAGE_METRICS = {"max_micro_batch_size", "recommended_micro_batch_size", "peak_GB_at_max", "limit_GB",
                 "memory_probe_exact", "memory_trials"}


def stage_metrics(result: dict[str, Any]) -> dict[str, Any]:
    return {"max_micro_batch_size": result["max_micro_batch_size"],
            "recommended_micro_batch_size": result["recommended_micro_batch_size"],
            "peak_GB_at_max": result["peak_GB_at_max"], "limit_GB": result["limit_GB"],
            # False: stopped at max_micro_batch or max_trials, so more may fit
            "memory_probe_exact": result["bounded_by"] is None, "memory_trials": len(result["trials"]),
            "probe": result}


def result_line(result: dict[str, Any]) -> str:
    largest = result["max_micro_batch_size"]
    limit = (f"{result['limit_GB']:.2f} GB ({result['limit_setting']})" if result.get("limit_GB")
             else "no limit (set train.memory_cap_GB on CPU)")
    if largest is None:
        return f"even micro_batch_size=1 does not fit in {limit}"
    bound = {"max_micro_batch": f"; the search stopped at its bound {largest}, more may fit",
             "max_trials": "; the search ran out of trials, more may fit"}.get(result["bounded_by"], "")
    return (f"largest micro-batch that fits: {largest} (peak {result['peak_GB_at_max']} GB of {limit}){bound}; "
            f"set train.micro_batch_size={result['recommended_micro_batch_size']} (the largest that divides "
            f"global_batch_size / ranks = {result['global_batch_size'] // result['world_size']})")


def run(ctx, settings) -> dict[str, Any]:
    from gonogo.train.config import load_train_config
    from gonogo.train.config import overrides_list

    preset = settings.config
    if preset.endswith(".toml") or "/" in preset:
        preset = str(ctx.resolve_path(preset))
    config, path = load_train_config(preset, overrides_list(settings.overrides))
    result = find_max_batch(config, path.name, settings.nproc, run_dir=ctx.run_dir.root, stage_dir=ctx.stage_dir,
                            timeout_s=settings.timeout_s, run_command=ctx.run_command,
                            max_micro_batch=settings.max_micro_batch, max_trials=settings.max_trials,
                            trial_steps=settings.trial_steps)
    ctx.progress(result_line(result))
    return stage_metrics(result)


def report(stage_dir: Path, metrics: dict[str, Any]):
    from gonogo.stages.base import ReportItem

    probe = metrics.get("probe") or {}
    rows = [{"micro_batch_size": t["micro_batch_size"], "fits": t["fits"], "peak GB": t["peak_GB"],
             "seconds": t["seconds"]} for t in probe.get("trials", [])]
    return [ReportItem(title="Memory probe: micro-batch sizes tried", table=rows)] if rows else None


def _make_stage():
    from gonogo.stages.base import StageKind

    return StageKind(name="memory",
                     description="the largest micro-batch that fits in memory (GPU memory, or train.memory_cap_GB "
                                 "on CPU), by doubling then bisection",
                     settings=MemorySettings, metrics=lambda settings: set(STAGE_METRICS), run=run,
                     report=report, devices=lambda settings: settings.nproc)


STAGE = _make_stage()
