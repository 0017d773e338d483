"""The training loop's checkpoint hook: when to save, resume and roll back, and what that cost.

A thin adapter over the training-side checkpointer (``gonogo.checkpoints.checkpointer.Checkpointer``:
DCP save, async save, resume): the loop asks the hook to resume at the start, to save at every
``checkpoint_every`` steps, at the last step and at a budget stop, to roll back after a bad loss,
and to wait for an async save still in flight at the end. The hook records each save
(``checkpoint_saved`` events) and the seconds the loop was blocked by it.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from gonogo.errors import UserError
from gonogo.events import events_file, write_event
from gonogo.train import guards

if TYPE_CHECKING:
    from gonogo.parallel import World
    from gonogo.train.job import Job

log = logging.getLogger(__name__)


class CheckpointHook:
    def __init__(self, job: Job, world: World):
        self.job, self.world, self.settings = job, world, job.config.train
        self.checkpointer: Any = None
        self.resumed_from: Optional[str] = None
        self.skipped_checkpoints: list[list[str]] = []
        self.blocked_per_save: list[float] = []  # seconds the loop waited in each save
        self.final_wait_s: Optional[float] = None
        if self.settings.checkpoint_async and self.settings.checkpoint and "gloo" not in world.backend:
            # DCP's async save stages through a CPU process group; NCCL alone cannot carry it
            raise UserError(f"train.checkpoint_async=true needs a CPU (gloo) backend in the process group, and "
                            f"this run uses {world.backend!r} only; set train.checkpoint_async=false")
        if self.settings.checkpoint:
            from gonogo.checkpoints.checkpointer import Checkpointer

            # each training stage of a plan keeps its own checkpoints (pretrain, finetune, drills ...)
            self.checkpointer = Checkpointer(job.run_dir / "checkpoints" / job.stage,
                                             async_mode=self.settings.checkpoint_async)

    def resume(self, model, optimizer, scheduler, loader, restarted: bool) -> int:
        """Load the checkpoint the job names (or, in a restarted attempt, this stage's newest good
        one); the step to continue after, 0 for a fresh start."""
        if self.checkpointer is None:
            return 0
        resume = self.job.resume
        if restarted and guards.has_committed(self.checkpointer.root):
            # torchrun restarted this attempt: continue from this stage's own newest good checkpoint
            resume = "auto"
        resumed = self.checkpointer.load_latest(resume, model, optimizer, scheduler, model_config=self.job.config.model)
        self.skipped_checkpoints = [[str(path), reason] for path, reason in resumed.skipped]
        self.resumed_from = str(resumed.path) if resumed.path is not None else None
        if resumed.loader_state is not None:
            loader.load_state_dict(resumed.loader_state)
        if resumed.path is not None:
            log.info("rank %d resumed from %s at step %d", self.world.rank, resumed.path, resumed.step)
        return resumed.step

    def is_due(self, step: int, stopping: bool) -> bool:
        every = self.settings.checkpoint_every
        return self.checkpointer is not None and (step == self.settings.steps or stopping
                                                  or bool(every and step % every == 0))

    def save(self, step: int, model, optimizer, scheduler, loader, extra: dict[str, Any],
             stopping: bool = False) -> Path:
        """Save (an async save first waits for the previous one to commit: blocked time too)."""
        config = self.job.config
        started = time.perf_counter()
        saved = self.checkpointer.save(step, model, optimizer, scheduler, loader.state_dict(), extra=extra,
                                       model_config=config.model,
                                       meta={"train": config.train.model_dump(), "data": config.data.model_dump(),
                                             **tokenizer_meta(config.data)},
                                       # the full weights once, on the last save: inference reads them
                                       consolidate=step == self.settings.steps or stopping)
        blocked = time.perf_counter() - started
        self.blocked_per_save.append(blocked)
        if self.world.rank == 0:
            write_event(events_file(self.job.run_dir), self.job.stage, rank=0, step=step, event="checkpoint_saved",
                        checkpoint=str(saved), blocked_s=blocked, asynchronous=self.settings.checkpoint_async,
                        committed_on_return=not self.settings.checkpoint_async)
        return saved

    def wait(self) -> None:
        """Until the last save is committed."""
        self.checkpointer.wait()

    def roll_back(self, model, optimizer, scheduler, loader) -> Optional[int]:
        """Restore the newest good checkpoint of this stage; its step, or None when there is none."""
        if self.checkpointer is None:
            return None
        self.checkpointer.wait()
        resumed = self.checkpointer.load_latest("auto", model, optimizer, scheduler, model_config=self.job.config.model)
        if resumed.path is None:
            return None
        if resumed.loader_state is not None:
            loader.load_state_dict(resumed.loader_state)
        return resumed.step

    def close(self) -> None:
        """Commit an async save still in flight (before the result is written)."""
        if self.checkpointer is not None:
            started = time.perf_counter()
            self.checkpointer.close()
            self.final_wait_s = time.perf_counter() - started

    def summary(self) -> dict[str, Any]:
        blocked = self.blocked_per_save
        return {
            "resumed_from": self.resumed_from,
            "skipped_checkpoints": self.skipped_checkpoints,
            "checkpoint_async": self.settings.checkpoint_async,
            "checkpoint_saves": len(blocked),
            # seconds the loop was blocked per save (staging only, when async); absent without saves
            "checkpoint_blocked_s_mean": statistics.mean(blocked) if blocked else None,
            "checkpoint_blocked_s_max": max(blocked) if blocked else None,
            "checkpoint_final_wait_s": self.final_wait_s if blocked else None,
        }


def tokenizer_meta(data) -> dict:
    """meta.json's tokenizer entries: a model's own tokenizer is named with the directory holding it."""
    if data.tokenizer is None:
        return {}
    directory = Path(data.tokenizer)
    directory = directory.parent if directory.is_file() else directory
    return {"tokenizer": "hf", "tokenizer_dir": str(directory.resolve())}
