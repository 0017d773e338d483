"""The run directory: the only coupling between stages and the report (see DESIGN.md).

    runs/<plan>-<UTC timestamp>/
      plan.toml  state.json  events.jsonl  summary.json  report.html  mlperf.log
      stages/<name>/metrics.json ...    checkpoints/step-N/
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from gonogo import events
from gonogo.errors import UserError
from gonogo.files import check_output_dir, read_json_file, write_json_atomic

__all__ = ["RunDir", "utc_stamp", "write_json_atomic"]


def utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


_MAX_SAME_SECOND = 1000  # bounded: a name is found, or the command stops


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
            stamp = utc_stamp()
            check_output_dir(base / f"{plan_name}-{stamp}")
            base.mkdir(parents=True, exist_ok=True)
            # claimed with one mkdir that fails if the name is taken: two commands started in the
            # same second (several nodes' `gonogo doctor` on a shared folder) never share a run
            for suffix in range(1, _MAX_SAME_SECOND + 1):
                root = base / (f"{plan_name}-{stamp}" + (f"-{suffix}" if suffix > 1 else ""))
                try:
                    root.mkdir()
                    break
                except FileExistsError:
                    continue
            else:
                raise UserError(f"{base}: {_MAX_SAME_SECOND} runs of plan {plan_name!r} in one second; "
                                "give each its own --out")
            (root / "stages").mkdir()
            return cls(root)
        else:
            root = Path(out)
            if root.exists() and (not root.is_dir() or any(root.iterdir())):
                raise UserError(
                    f"{root}: already exists and is not empty; a run directory is never overwritten "
                    f"(choose another --out, or add --resume to continue that run)")
        check_output_dir(root)  # before any work, not when the first result is written
        root.mkdir(parents=True, exist_ok=True)
        (root / "stages").mkdir(exist_ok=True)
        return cls(root)

    @classmethod
    def open(cls, path: Path) -> "RunDir":
        root = Path(path)
        if not (root / "plan.toml").is_file():
            raise UserError(f"{root}: not a gonogo run directory (no plan.toml in it)")
        check_output_dir(root, flag="")  # a resumed run and a re-rendered report write into it
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
        return events.events_file(self.root)

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
        fix = "the run directory is damaged; move state.json away to start its record afresh, or use another run"
        state = read_json_file(self.state_path, fix)
        if not isinstance(state, dict) or not isinstance(state.get("stages", {}), dict):
            raise UserError(f"{self.state_path}: not a gonogo state (no stages table); {fix}")
        return state

    def write_state(self, state: dict[str, Any]) -> None:
        write_json_atomic(self.state_path, state)

    def event(self, stage: str, **fields: Any) -> None:
        events.write_event(self.events_path, stage, **fields)

    def read_events(self, **filters: Any) -> list[events.Event]:
        """This run's events (see :func:`gonogo.events.read_events` for the filters)."""
        return events.read_events(self.events_path, **filters)

    def stage_metrics(self, name: str) -> dict[str, Any]:
        path = self.stage_dir(name, create=False) / "metrics.json"
        if not path.is_file():
            return {}
        metrics = read_json_file(path, "the stage's results are damaged; run the stage again (--resume) "
                                       "or move the file away")
        if not isinstance(metrics, dict):
            raise UserError(f"{path}: not a table of metrics; run the stage again or move the file away")
        return metrics
