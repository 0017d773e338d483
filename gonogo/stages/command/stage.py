"""Stage kind ``command``: any program as a stage, its metrics read from a JSON file it writes.

The way to bring a check gonogo does not have (a site-specific smoke test, a vendor tool) under
the same gates and report. The program gets ``GONOGO_STAGE_DIR`` and ``GONOGO_RUN_DIR`` in its
environment and writes ``$GONOGO_STAGE_DIR/<metrics_file>`` (a JSON object of metric values).
The stage declares the metric names up front so gates on them are checked before anything runs.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pydantic import Field, field_validator

from gonogo.errors import StageFailed, UserError
from gonogo.stages.base import StageContext, StageKind, StageSettings


class CommandSettings(StageSettings):
    argv: list[str] = Field(min_length=1)
    metrics: list[str] = Field(default_factory=list)
    metrics_file: str = "metrics.out.json"
    timeout_s: float = Field(default=600, gt=0)
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("metrics_file")
    @classmethod
    def _relative(cls, value: str) -> str:
        if os.path.isabs(value) or ".." in value.split("/"):
            raise ValueError("metrics_file must be a path inside the stage folder")
        return value


def run(context: StageContext, settings: CommandSettings) -> dict[str, Any]:
    env = dict(os.environ, GONOGO_STAGE_DIR=str(context.stage_dir.resolve()),
               GONOGO_RUN_DIR=str(context.run_dir.root.resolve()), **settings.env)
    argv = [os.path.expandvars(part) if "$GONOGO" in part else part for part in settings.argv]
    context.progress(" ".join(argv)[:80])
    try:
        code = context.run_command(argv, timeout=settings.timeout_s, log_name="command.log", env=env,
                                   on_line=context.progress)
    except FileNotFoundError:
        raise UserError(f"stage {context.name!r}: program {argv[0]!r} not found") from None
    path = context.stage_dir / settings.metrics_file
    metrics: dict[str, Any] = {}
    if path.is_file():
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise StageFailed(f"{path} is not valid JSON: {error}") from None
        if not isinstance(metrics, dict):
            raise StageFailed(f"{path} must hold a JSON object of metric values")
    metrics["exit_code"] = code
    if code != 0:
        raise StageFailed(f"{argv[0]} exited with code {code}; see {context.stage_dir / 'command.log'}")
    return metrics


STAGE = StageKind(
    name="command",
    description="any program as a stage; metrics from a JSON file it writes",
    settings=CommandSettings,
    metrics=lambda settings: set(settings.metrics) | {"exit_code"},
    run=run,
)
