"""The run directory: the only coupling between stages and the report (see DESIGN.md).

    runs/<plan>-<UTC timestamp>/
      plan.toml  state.json  events.jsonl  summary.json  report.html  mlperf.log
      stages/<name>/metrics.json ...    checkpoints/step-N/
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from gonogo.errors import UserError


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so a reader never sees half a file: temporary file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=False, default=_json_default)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One line per record, written with a single O_APPEND write so processes don't interleave."""
    line = (json.dumps(record, default=_json_default) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root)

    # -- creation -------------------------------------------------------------------------
    @classmethod
    def create(cls, out: Optional[Path], plan_name: str, base: Path = Path("runs")) -> "RunDir":
        """A new run directory. An existing, non-empty directory is never reused."""
        if out is None:
            from gonogo.names import check_path_component

            check_path_component(plan_name, "plan name")  # the run stays a folder of ``base``
            root = base / f"{plan_name}-{utc_stamp()}"
            suffix = 1
            while root.exists():
                suffix += 1
                root = base / f"{plan_name}-{utc_stamp()}-{suffix}"
        else:
            root = Path(out)
            if root.exists() and (not root.is_dir() or any(root.iterdir())):
                raise UserError(
                    f"{root}: already exists and is not empty; a run directory is never overwritten "
                    f"(choose another --out, or add --resume to continue that run)")
        root.mkdir(parents=True, exist_ok=True)
        (root / "stages").mkdir(exist_ok=True)
        return cls(root)

    @classmethod
    def open(cls, path: Path) -> "RunDir":
        root = Path(path)
        if not (root / "plan.toml").is_file():
            raise UserError(f"{root}: not a gonogo run directory (no plan.toml in it)")
        return cls(root)

    @classmethod
    def newest(cls, plan_name: str, base: Path = Path("runs")) -> "RunDir":
        candidates = sorted(p for p in base.glob(f"{plan_name}-*") if (p / "plan.toml").is_file())
        if not candidates:
            raise UserError(f"no earlier run of plan {plan_name!r} under {base}/ to resume (give --out RUN_DIR)")
        return cls(candidates[-1])

    # -- paths ----------------------------------------------------------------------------
    @property
    def plan_path(self) -> Path:
        return self.root / "plan.toml"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def events_path(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.json"

    @property
    def report_path(self) -> Path:
        return self.root / "report.html"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def mlperf_log_path(self) -> Path:
        return self.root / "mlperf.log"

    def stage_dir(self, name: str, create: bool = True) -> Path:
        path = self.root / "stages" / name
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path

    # -- state ----------------------------------------------------------------------------
    def read_state(self) -> dict[str, Any]:
        if not self.state_path.is_file():
            return {"stages": {}}
        return json.loads(self.state_path.read_text(encoding="utf-8"))

    def write_state(self, state: dict[str, Any]) -> None:
        write_json_atomic(self.state_path, state)

    def event(self, stage: str, **fields: Any) -> None:
        record = {"time": time.time(), "stage": stage, **fields}
        append_jsonl(self.events_path, record)

    def stage_metrics(self, name: str) -> dict[str, Any]:
        path = self.stage_dir(name, create=False) / "metrics.json"
        if not path.is_file():
            return {}
        return json.loads(path.read_text(encoding="utf-8"))
