"""The torchrun entry of pretraining: ``python -m gonogo.train.worker JOB.json``.

The parent (``gonogo train`` or the ``train`` stage) resolves the config and writes ``JOB.json``
in the stage directory; every rank reads it, joins the process group, runs the loop, and rank 0
writes ``result.json`` (the stage metrics) next to it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from gonogo.rundir import write_json_atomic
from gonogo.train.job import read_job


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gonogo.train.worker")
    parser.add_argument("job", type=Path, help="the resolved job JSON written by the parent")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    import torch.distributed as dist

    from gonogo.train.loop import train
    from gonogo.parallel import init_distributed, leave_together

    job = read_job(args.job)
    world = init_distributed(job.config.train.init_timeout_s)
    try:
        try:
            result = train(job, world)
        except BaseException as error:
            from gonogo.train import memory, triage

            if memory.is_oom(error):  # ends this rank and stops the job: no restart, it would run out again
                memory.handle_oom(error, stage_dir=job.stage_dir, rank=world.rank, device_type=world.device.type,
                                  micro_batch_size=job.config.train.micro_batch_size)
            triage.on_exception(error)
            raise
        if result is not None:
            write_json_atomic(job.result_path, result)
        # leave together: a rank that tears its gloo pairs down while a peer still uses them can
        # abort in C++ ("terminate called without an active exception", seen under load)
        dist.barrier()
        leave_together(dist, world.world_size)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # the guard a process-based async checkpoint save needs
    raise SystemExit(main())
