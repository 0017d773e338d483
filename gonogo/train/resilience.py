"""The training loop's resilience part: what keeps a rank honest and a run recoverable.

``Resilience`` puts together, for one attempt, the pieces of gonogo.train.guards (hang watchdog,
section timer and straggler scores, loss guard, device-hour budget), the fault injector of the
drills (gonogo.train.fault_injection), the triage hooks (gonogo.train.triage) and the CPU memory
cap (gonogo.train.memory). The loop calls it at fixed points of a step; it records the events
(``attempt_started``, ``loss_guard``, ``straggler_scores``, ``budget_stopped``) and gives the
resilience metrics at the end.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from gonogo.events import events_file, read_events, write_event
from gonogo.train import guards, triage
from gonogo.train.fault_injection import Fault, Injector, restart_count
from gonogo.train.memory import MemoryGuard

if TYPE_CHECKING:
    from pathlib import Path

    from gonogo.parallel import World
    from gonogo.train.checkpoint_hook import CheckpointHook
    from gonogo.train.job import Job

log = logging.getLogger(__name__)


class Resilience:
    """One attempt's watchdog, guards and fault injection (see the module doc)."""

    def __init__(self, job: Job, world: World, checkpoints: CheckpointHook, start_step: int):
        settings = job.config.train
        self.job, self.world, self.settings, self.checkpoints = job, world, settings, checkpoints
        self.events_path: Path = events_file(job.run_dir)
        self.restarts = restart_count()
        if world.rank == 0:
            write_event(self.events_path, job.stage, rank=0, step=start_step, event="attempt_started",
                        restart=self.restarts, resumed_from=checkpoints.resumed_from,
                        skipped_checkpoints=checkpoints.skipped_checkpoints)
        self.injector = Injector.from_env(rank=world.rank, stage=job.stage, events_path=self.events_path)
        self.watchdog = guards.Watchdog(rank=world.rank, stage=job.stage, stage_dir=job.stage_dir,
                                        events_path=self.events_path, timeout_s=settings.watchdog_timeout_s,
                                        min_timeout_s=settings.watchdog_min_timeout_s, factor=settings.watchdog_factor,
                                        startup_timeout_s=settings.init_timeout_s).start()
        self.triage = triage.install(job.run_dir, job.stage, job.stage_dir, world.rank, world.world_size,
                                     self.watchdog)
        self.memory_guard = MemoryGuard(world.device.type, settings.memory_cap_GB)
        self.timer = guards.SectionTimer(world.device.type)
        self.stragglers = (guards.StragglerDetector(world.world_size, world.device, settings.straggler_threshold)
                           if settings.straggler_every and world.world_size > 1 else None)
        self.loss_guard = guards.LossGuard(settings.spike_factor)
        self.rollbacks, self.skipped_batches, self.budget_stopped = 0, 0, False
        self._skip_steps: set[int] = set()
        self._over_budget = False
        # a fault that corrupts a committed checkpoint needs it committed first, on every rank alike
        fault = Fault.from_env()
        self._commit_before_fault = (settings.checkpoint_async and fault is not None
                                     and fault.kind == "corrupt-checkpoint")

    # -- inside a step ----------------------------------------------------------------------------
    def section(self, name: str) -> contextlib.AbstractContextManager:
        """Time a section of the step (data, forward_backward, optimizer) for the straggler scores."""
        return self.timer.section(name)

    def long_phase(self) -> contextlib.AbstractContextManager:
        """Checkpoints, validation, rollbacks: the watchdog's start-up timeout applies meanwhile."""
        return self.watchdog.long_phase()

    def skips_batch(self, step: int) -> bool:
        """Whether this step's batch is the one that gave a bad loss before a rollback: drop it."""
        if step not in self._skip_steps:
            return False
        self._skip_steps.discard(step)
        self.skipped_batches += 1
        return True

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return self.injector.loss(step, loss)

    @contextlib.contextmanager
    def forward_backward(self, step: int) -> Iterator[None]:
        """The forward/backward section, then (a straggler drill) the injected slowness."""
        with self.timer.section("forward_backward"):
            yield
        with self.timer.section("forward_backward"):
            self.injector.slow_down(step, self.timer.last_seconds)

    def agree(self, step_loss: torch.Tensor) -> float:
        """One small all_reduce: every rank sees the same step loss and the same budget decision."""
        over_budget = self.world.rank == 0 and guards.budget_spent(self.job.budget_started, self.world.world_size,
                                                                   self.job.budget_device_hours)
        agreed = torch.stack([step_loss, torch.tensor(float(over_budget), dtype=torch.float64,
                                                      device=self.world.device)])
        dist.all_reduce(agreed)
        self._over_budget = bool(agreed[1] > 0)
        return float(agreed[0]) / self.world.world_size

    def check_loss(self, loss: float) -> Optional[str]:
        """Why the agreed step loss is bad, or None: then this step's budget decision stands."""
        problem = self.loss_guard.check(loss)
        if problem is None:
            self.budget_stopped = self._over_budget
        return problem

    def roll_back(self, step: int, problem: str, restore: Callable[[], Optional[int]]) -> Optional[int]:
        """The loss guard's recovery: ``restore()`` the newest good checkpoint (its step) and skip
        this batch when it comes round again; None when there is none (the update alone is dropped)."""
        self.rollbacks += 1
        if self.rollbacks > self.settings.max_rollbacks:
            raise RuntimeError(f"step {step}: {problem}, after {self.settings.max_rollbacks} rollbacks already "
                               f"(train.max_rollbacks); the run is not recovering: check the data and the "
                               f"learning rate")
        with self.watchdog.long_phase():
            back_to = restore()
        if self.world.rank == 0:
            write_event(self.events_path, self.job.stage, rank=0, step=step, event="loss_guard", reason=problem,
                        rolled_back_to=back_to, rollback=self.rollbacks)
        log.warning("step %d: %s; rolled back to step %s, the batch is skipped", step, problem,
                    back_to if back_to is not None else "(none: update dropped)")
        if back_to is None:
            self.skipped_batches += 1
        else:
            self._skip_steps.add(step)
        return back_to

    def beat(self, step: int) -> None:
        self.watchdog.beat(step)

    def step_done(self, step: int, seconds: float) -> None:
        """After the optimizer step: the watchdog's beat, the memory cap, the straggler scores."""
        self.timer.steps += 1
        self.watchdog.beat(step, seconds)
        self.memory_guard.check(step)  # the CPU cap (train.memory_cap_GB): over it, this rank stops as on an OOM
        if self.stragglers is not None and step % self.settings.straggler_every == 0:
            report = self.stragglers.gather(self.timer)
            if self.world.rank == 0:
                write_event(self.events_path, self.job.stage, rank=0, step=step, event="straggler_scores",
                            relative=report["relative"], individual=report["individual"],
                            straggler_ranks=report["straggler_ranks"],
                            slow_sections={str(k): v for k, v in report["slow_sections"].items()},
                            warmup=bool(report.get("warmup")))
                if report["straggler_ranks"] and not report.get("warmup"):
                    log.warning("step %d: straggler rank(s) %s (sections %s)", step, report["straggler_ranks"],
                                report["slow_sections"])

    def after_checkpoint(self, step: int, saved: Path) -> None:
        if self._commit_before_fault:
            self.checkpoints.wait()
        self.injector.after_checkpoint(step, saved)

    def after_step(self, step: int) -> bool:
        """The end of a step (faults that kill or hang act here); True when the budget says stop."""
        self.injector.after_step(step)
        if self.budget_stopped:
            log.warning("step %d: the plan's device-hour budget is spent; stopping after a checkpoint", step)
            if self.world.rank == 0:
                write_event(self.events_path, self.job.stage, rank=0, step=step, event="budget_stopped",
                            budget_device_hours=self.job.budget_device_hours)
        return self.budget_stopped

    # -- at the end ---------------------------------------------------------------------------------
    def stop(self) -> None:
        self.watchdog.stop()
        self.timer.close()
        self.triage.stop()

    def summary(self) -> dict[str, Any]:
        stragglers = self.stragglers
        return {
            "restarts": self.restarts,
            "hang_detections": len(read_events(self.events_path, stage=self.job.stage, kind="hang_detected")),
            "watchdog_timeout_s": self.watchdog.timeout_s(),
            "rollbacks": self.rollbacks,
            "skipped_batches": self.skipped_batches,
            "budget_stopped": self.budget_stopped,
            "straggler_ranks": sorted(stragglers.straggler_ranks) if stragglers else [],
            "min_relative_score": stragglers.min_relative_score if stragglers else None,
            "straggler_reports": stragglers.reports[-3:] if stragglers else [],
        }
