"""The memory probe: the largest micro-batch that fits, tried on the real model under torchrun.

``python -m gonogo.train.memory_probe JOB.json`` is every rank's entry; ``find_max_batch`` runs
it from the parent (see gonogo.train.memory for the method: doubling, then bisection).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from gonogo.train.memory import GB, RESULT_NAME, peak_rss_bytes, recommended, reset_peak, search_sizes

log = logging.getLogger(__name__)


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
    parser = argparse.ArgumentParser(prog="python -m gonogo.train.memory_probe")
    parser.add_argument("job", type=Path)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    import torch.distributed as dist

    from gonogo.rundir import write_json_atomic
    from gonogo.parallel import init_distributed, leave_together
    from gonogo.train.job import read_job

    job = read_job(args.job)
    probe = json.loads(args.job.read_text(encoding="utf-8"))["probe"]
    world = init_distributed(job.config.train.init_timeout_s)
    try:
        result = _probe(job, world, probe)
        if result is not None:
            write_json_atomic(job.stage_dir / RESULT_NAME, result)
        dist.barrier()
        leave_together(dist, world.world_size)  # as the trainer's workers: no rank tears its pairs down early
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
    from gonogo.train.job import write_job

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
    argv = torchrun_command("gonogo.train.memory_probe", [str(job_path)], nproc, max_restarts=0)
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
