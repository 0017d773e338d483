"""Fault injection inside training workers (what the drills use).

A fault is given to the workers as JSON in the ``GONOGO_FAULT`` environment variable, e.g.
``{"kind": "kill", "rank": 1, "step": 7}``. Kinds:

- ``kill``: the rank SIGKILLs itself after ``step``;
- ``hang``: the rank stops making progress after ``step`` (sleeps, bounded by ``HANG_SECONDS``);
- ``straggler``: the rank's forward/backward takes ``factor`` times as long (busy compute, as a
  slow device would) from ``step`` on;
- ``nan``: the loss of ``step`` becomes NaN on the rank;
- ``torn-checkpoint``: rank 0 is SIGKILLed while the checkpoint of ``step`` is being written
  (its files are written, it is not committed yet);
- ``corrupt-checkpoint``: after the checkpoint of ``step`` is committed, rank 0 flips bytes in
  one of its files and SIGKILLs itself, so the restart finds a corrupt newest checkpoint;
- ``oom``: after ``step`` the rank fills ``factor`` GB of host memory and keeps it, so the next
  step's memory check (``train.memory_cap_GB``, CPU) finds the rank over its cap.

Faults that end a process fire only in the first attempt (``TORCHELASTIC_RESTART_COUNT`` = 0),
so the restarted attempt shows recovery; ``nan`` fires once per process. Every fault writes a
``fault_injected`` event (with its time) to events.jsonl just before it acts.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

ENV = "GONOGO_FAULT"
KINDS = ("kill", "hang", "straggler", "nan", "torn-checkpoint", "corrupt-checkpoint", "oom")
HANG_SECONDS = 900.0  # a hung rank still ends by itself; the watchdog or the stage timeout ends it first


@dataclass
class Fault:
    kind: str
    rank: int
    step: int
    factor: float = 3.0

    def to_env(self) -> dict[str, str]:
        return {ENV: json.dumps({"kind": self.kind, "rank": self.rank, "step": self.step, "factor": self.factor})}

    @classmethod
    def from_env(cls) -> Optional["Fault"]:
        text = os.environ.get(ENV)
        if not text:
            return None
        data = json.loads(text)
        fault = cls(kind=data["kind"], rank=int(data["rank"]), step=int(data["step"]),
                    factor=float(data.get("factor", 3.0)))
        if fault.kind not in KINDS:
            raise ValueError(f"{ENV}: unknown fault kind {fault.kind!r}; known: {', '.join(KINDS)}")
        return fault


def restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


class Injector:
    """The hooks the training loop calls; every hook is a no-op without a fault for this rank."""

    def __init__(self, fault: Optional[Fault], *, rank: int, stage: str, events_path: Path):
        self.fault = fault if fault is not None and fault.rank == rank else None
        self.rank, self.stage, self.events_path = rank, stage, Path(events_path)
        self.first_attempt = restart_count() == 0
        self._nan_fired = False
        self._straggler_logged = False
        if self.fault and self.fault.kind in ("torn-checkpoint", "corrupt-checkpoint") and self.first_attempt:
            self._patch_commit()

    @classmethod
    def from_env(cls, *, rank: int, stage: str, events_path: Path) -> "Injector":
        return cls(Fault.from_env(), rank=rank, stage=stage, events_path=events_path)

    def _record(self, step: int, **fields: Any) -> None:
        from gonogo.events import write_event

        assert self.fault is not None
        write_event(self.events_path, self.stage, rank=self.rank, step=step, event="fault_injected",
                    fault=self.fault.kind, **fields)
        log.warning("fault injected: %s on rank %d at step %d", self.fault.kind, self.rank, step)

    def _active(self, kind: str) -> Optional[Fault]:
        """This rank's fault when it is of ``kind``, else None."""
        return self.fault if self.fault is not None and self.fault.kind == kind else None

    # -- hooks ----------------------------------------------------------------------------------
    def loss(self, step: int, loss):
        """The loss of a micro-batch, made NaN once at the fault's step."""
        fault = self._active("nan")
        if fault is not None and step == fault.step and not self._nan_fired:
            self._nan_fired = True
            self._record(step)
            return loss * float("nan")
        return loss

    def slow_down(self, step: int, seconds: float) -> None:
        """Called after this rank's forward/backward of ``step`` that took ``seconds``."""
        fault = self._active("straggler")
        if fault is None or step < fault.step:
            return
        if not self._straggler_logged:
            self._straggler_logged = True
            self._record(step, factor=fault.factor)
        # busy work, not a sleep: a slow device burns its time computing
        deadline = time.process_time() + (fault.factor - 1.0) * seconds
        while time.process_time() < deadline:
            pass

    def after_step(self, step: int) -> None:
        if not self.first_attempt or self.fault is None or step != self.fault.step:
            return
        if self.fault.kind == "kill":
            self._record(step)
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.fault.kind == "oom":
            import torch

            self._record(step, gigabytes=self.fault.factor)
            self._ballast = torch.ones(int(self.fault.factor * 1e9), dtype=torch.uint8)  # every page touched
        elif self.fault.kind == "hang":
            self._record(step)
            deadline = time.monotonic() + HANG_SECONDS
            while time.monotonic() < deadline:
                time.sleep(1.0)

    def after_checkpoint(self, step: int, path: Path) -> None:
        """After the checkpoint of ``step`` was committed at ``path`` (every rank calls it)."""
        fault = self._active("corrupt-checkpoint")
        if fault is not None and self.first_attempt and step == fault.step:
            flipped = flip_bytes(path)
            self._record(step, checkpoint=str(path), file=flipped)
            os.kill(os.getpid(), signal.SIGKILL)

    def _patch_commit(self) -> None:
        """Torn checkpoint: kill this process inside the save, after the data files are written
        and before the COMMITTED marker (what a crash or a preemption mid-save leaves)."""
        from gonogo.checkpoints import manifest

        original = manifest.commit
        fault = self.fault
        assert fault is not None  # called from __init__ only when there is a fault

        def commit(directory: Path, known=None):
            step = manifest.parse_step(Path(Path(directory).name.replace(".tmp-", "", 1)))
            if fault.kind == "torn-checkpoint" and step is not None and step == fault.step:
                self._record(step, checkpoint=str(directory))
                os.kill(os.getpid(), signal.SIGKILL)
            return original(directory, known)

        manifest.commit = commit


def flip_bytes(checkpoint: Path, count: int = 16) -> str:
    """Invert ``count`` bytes in the middle of the checkpoint's largest DCP file; its name."""
    files = sorted((checkpoint / "dcp").glob("*.distcp"), key=lambda p: p.stat().st_size)
    target = files[-1] if files else checkpoint / "model.safetensors"
    with open(target, "r+b") as handle:
        size = target.stat().st_size
        offset = max(0, size // 2 - count // 2)
        handle.seek(offset)
        data = handle.read(count)
        handle.seek(offset)
        handle.write(bytes(b ^ 0xFF for b in data))
        handle.flush()
        os.fsync(handle.fileno())
    return str(target.relative_to(checkpoint))
