"""The run's event log, ``<run>/events.jsonl``: the one writer and the one reader.

Every line is one JSON object: ``time`` (epoch seconds) and ``stage`` first, then the caller's
fields in the order given. Two shapes share the file:

- an **event** has an ``event`` field naming its kind (``stage_start``, ``hang_detected``,
  ``fault_injected``, ``soak_window`` ...), usually with ``rank`` and ``step``;
- a **metrics line** has no ``event`` field: a training rank's logged window (``step``,
  ``loss``, ``tokens_per_second``, ``step_time_s_rank`` ...).

Several processes (every training rank, the plan runner, a stage's own children) append to the
same file, so each line is written with one ``write()`` on an ``O_APPEND`` descriptor: lines of
different processes never interleave. A reader skips a line a crash cut short.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional, Union

from gonogo.files import json_default

EVENTS_FILE = "events.jsonl"


def events_file(run_root: Union[str, Path]) -> Path:
    """The event log of the run directory ``run_root``."""
    return Path(run_root) / EVENTS_FILE


def write_event(path: Union[str, Path], stage: str, **fields: Any) -> None:
    """Append one line ``{"time": now, "stage": stage, **fields}`` to the log at ``path``.

    An event passes ``event="<kind>"``; a metrics line passes no ``event``.
    """
    record = {"time": time.time(), "stage": stage, **fields}
    line = (json.dumps(record, default=json_default) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


class Event(Mapping[str, Any]):
    """One line of the log: its common fields as attributes, every field by key."""

    __slots__ = ("record",)

    def __init__(self, record: dict[str, Any]):
        self.record = record

    @property
    def time(self) -> float:
        return float(self.record.get("time", 0.0))

    @property
    def stage(self) -> Optional[str]:
        return self.record.get("stage")

    @property
    def kind(self) -> Optional[str]:
        """The event's kind; None for a metrics line."""
        return self.record.get("event")

    @property
    def rank(self) -> Optional[int]:
        return self.record.get("rank")

    @property
    def step(self) -> Optional[int]:
        return self.record.get("step")

    @property
    def is_metrics(self) -> bool:
        return "event" not in self.record

    def fields(self, *leave_out: str) -> dict[str, Any]:
        """The line's fields other than ``time``, ``stage``, ``rank``, ``event`` and ``leave_out``."""
        skip = {"time", "stage", "rank", "event", *leave_out}
        return {key: value for key, value in self.record.items() if key not in skip}

    def __getitem__(self, key: str) -> Any:
        return self.record[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.record)

    def __len__(self) -> int:
        return len(self.record)

    def __repr__(self) -> str:
        return f"Event({self.record!r})"


def read_events(path: Union[str, Path], *, stage: Optional[str] = None, kind: Optional[str] = None,
                rank: Optional[int] = None, metrics: Optional[bool] = None) -> list[Event]:
    """The lines of the log at ``path`` in the order written, kept when they match every filter
    given: ``stage``, ``kind`` (the ``event`` field), ``rank``, and ``metrics`` (True: metrics
    lines only; False: events only). A missing log is empty; an unreadable line is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    needle = f'"{kind}"' if kind is not None else None
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if needle is not None and needle not in line:  # cheap: most lines of a long run are metrics
            continue
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a crash: the rest still counts
            continue
        if not isinstance(record, dict):
            continue
        event = Event(record)
        if stage is not None and event.stage != stage:
            continue
        if kind is not None and event.kind != kind:
            continue
        if rank is not None and event.rank != rank:
            continue
        if metrics is not None and event.is_metrics != metrics:
            continue
        kept.append(event)
    return kept
