"""What the parent hands each training rank: the job, and its JSON file in the stage directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from gonogo.rundir import write_json_atomic
from gonogo.train.config import TrainConfig


@dataclass
class Job:
    """What the parent hands a worker (the resolved JSON file it writes in the stage directory)."""

    config: TrainConfig
    config_filename: str
    run_dir: Path
    stage: str
    stage_dir: Path
    resume: str = "auto"      # "auto" | "never" | a checkpoint path
    # device hours left to the plan when the stage started, and when (time.time()) it started
    budget_device_hours: Optional[float] = None
    budget_started: Optional[float] = None

    @property
    def result_path(self) -> Path:
        return self.stage_dir / "result.json"

    @property
    def tensorboard_dir(self) -> Path:
        return self.stage_dir / "tb"


def read_job(path: Path) -> Job:
    data = json.loads(path.read_text(encoding="utf-8"))
    return Job(config=TrainConfig.model_validate(data["config"]), config_filename=data["config_filename"],
               run_dir=Path(data["run_dir"]), stage=data["stage"], stage_dir=Path(data["stage_dir"]),
               resume=data.get("resume", "auto"), budget_device_hours=data.get("budget_device_hours"),
               budget_started=data.get("budget_started"))


def write_job(path: Path, *, config: TrainConfig, config_filename: str, run_dir: Path, stage: str,
              stage_dir: Path, resume: str, budget_device_hours: float | None = None,
              budget_started: float | None = None) -> None:
    write_json_atomic(path, {"config": config.model_dump(mode="json"), "config_filename": config_filename,
                             "run_dir": str(Path(run_dir).resolve()), "stage": stage,
                             "stage_dir": str(Path(stage_dir).resolve()), "resume": resume,
                             "budget_device_hours": budget_device_hours, "budget_started": budget_started})
