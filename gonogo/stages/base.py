"""What a stage kind is, and what a running stage gets from the runner.

A stage kind declares its settings (a pydantic model), the metrics it produces (as a function
of its settings, so ``maj@8`` or ``all_reduce_busbw_GBps`` can depend on them) and a ``run``
function. The runner validates every gate and assumption of a plan against the declared metrics
before anything runs, then calls ``run`` with a ``StageContext`` and writes what it returns to
``stages/<name>/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from gonogo.procs import ProcessTimeout, run_process
from gonogo.rundir import RunDir
from gonogo.errors import StageFailed, UserError
from gonogo.typed_config import Strict

log = logging.getLogger(__name__)

OUTPUTS_FILE = "outputs.json"
Metrics = dict[str, Any]


class StageSettings(Strict):
    """Base of every stage kind's settings (the stage table's keys other than the runner's)."""


@dataclass
class ReportItem:
    """One block of a stage's report section: a plot (PNG bytes), a table, or a paragraph."""

    title: str
    png: Optional[bytes] = None
    table: Optional[list[dict[str, Any]]] = None
    text: Optional[str] = None


@dataclass
class StageKind:
    name: str
    description: str
    settings: type[StageSettings]
    metrics: Callable[[Any], set[str]]
    run: Callable[["StageContext", Any], Metrics]
    # None, or no items: the stage adds nothing to the report beyond its metrics and gates
    report: Optional[Callable[[Path, Metrics], Optional[list[ReportItem]]]] = None
    # how many devices the stage occupies, for the device-hour budget
    devices: Callable[[Any], int] = lambda settings: 1
    # before anything of the plan runs: raise UserError for what cannot work here (a missing engine)
    preflight: Callable[[Any], None] = lambda settings: None
    # the gates `gonogo <kind>` applies when it runs this stage alone (a plan writes its own)
    default_gates: Callable[[Any], list[str]] = lambda settings: []
    # how `gonogo <kind>` reads its command line; None: every flag derived from the settings
    command: Optional["StageCommand"] = None


@dataclass
class StageCommand:
    """What the command line of a stage kind needs beyond its settings model.

    ``gonogo <kind>`` derives ``--field-name`` flags from the settings model unless
    ``add_arguments`` writes them by hand (a positional preset, ``key=value`` overrides, a flag
    name older than the setting); then ``settings`` turns the parsed flags into the settings
    table. Either way the stage runs through the plan runner (gonogo.stage_cli).
    """

    # hand-written flags (``--out`` is always there); None: one flag per settings field
    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None
    # the parsed flags -> the settings table (validated by the settings model); None: derived
    settings: Optional[Callable[[argparse.Namespace], dict[str, Any]]] = None
    # gates the flags set (``soak --max-drift 2``); None: the kind's default gates
    gates: Optional[Callable[[argparse.Namespace], list[str]]] = None
    # checks of the user's input before the run directory exists (UserError: one line, exit 2)
    check: Callable[[argparse.Namespace, Any], None] = lambda args, settings: None
    # an existing run directory the command continues (``train --out RUN``), or None: a new one
    continue_run: Callable[[argparse.Namespace, Any], Optional[RunDir]] = lambda args, settings: None
    # prints what the stage measured (tables) once it ran; the runner already wrote metrics.json
    summary: Optional[Callable[[argparse.Namespace, Path, Metrics], None]] = None
    # what to do when the stage is interrupted, for state.json (``--resume`` of a plan otherwise)
    resume_hint: Optional[Callable[[RunDir], str]] = None
    # a mode of the command that is not one gated stage (``gonogo serve`` in the foreground):
    # returns the exit code, or None to run the stage
    instead: Callable[[argparse.Namespace], Optional[int]] = lambda args: None


@dataclass
class StageContext:
    name: str
    kind: str
    run_dir: RunDir
    stage_dir: Path
    budget_left_hours: Optional[float] = None
    # the plan's [plan] price_per_device_hour (cost alarms; the capacity stage's default price)
    price_per_device_hour: Optional[float] = None
    plan_dir: Path = field(default_factory=Path.cwd)
    on_progress: Callable[[str], None] = lambda text: None
    started: float = field(default_factory=time.monotonic)
    # callbacks the runner calls when the plan ends (e.g. stop a server later stages use)
    plan_cleanups: list = field(default_factory=list)

    def progress(self, text: str) -> None:
        self.on_progress(text)

    def event(self, **fields: Any) -> None:
        self.run_dir.event(self.name, **fields)

    def at_plan_end(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the plan ends, however it ends (success, failure, Ctrl-C)."""
        self.plan_cleanups.append(callback)

    def resolve_path(self, path: str | Path) -> Path:
        """A path from the plan, relative to the plan file's folder."""
        path = Path(path).expanduser()
        return path if path.is_absolute() else (self.plan_dir / path)

    def resolve_model(self, value: Optional[str]) -> Optional[str]:
        """A model reference from the plan: ``@stage`` (what that stage produced in this run), a
        URL (left as it is), or a path relative to the plan's folder. None stays None."""
        if value is None or value.startswith(("http://", "https://")):
            return value
        if not value.startswith("@"):
            return str(self.resolve_path(value))
        name = value[1:]
        outputs = self.run_dir.stage_dir(name, create=False) / OUTPUTS_FILE
        if outputs.is_file():
            produced = json.loads(outputs.read_text(encoding="utf-8")).get("checkpoint")
            if produced:
                return str(produced)
        checkpoints = self.run_dir.checkpoints_dir / name
        if checkpoints.is_dir():
            return str(checkpoints)
        raise UserError(f"stage {self.name!r}: {value!r}: stage {name!r} has produced no model in this run "
                        f"(run it first, or give a checkpoint path)")

    def record_output(self, checkpoint: Path) -> None:
        """Say which model this stage produced, for ``@<this stage>`` references of later stages."""
        from gonogo.rundir import write_json_atomic

        write_json_atomic(self.stage_dir / OUTPUTS_FILE, {"checkpoint": str(Path(checkpoint).resolve())})

    def earlier_metrics(self, stage_name: str) -> Metrics:
        return self.run_dir.stage_metrics(stage_name)

    def run_command(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        log_name: str,
        env: Optional[dict[str, str]] = None,
        on_line: Optional[Callable[[str], None]] = None,
    ) -> int:
        """Run a child process group (torchrun) bounded by ``timeout``, output to a log file."""
        log_path = self.stage_dir / log_name
        try:
            return run_process(argv, timeout=timeout, log_path=log_path, env=env, on_line=on_line)
        except ProcessTimeout as error:
            raise StageFailed(
                f"{self.name}: did not finish within {error.seconds:.0f} s and was stopped "
                f"(a hung or dead rank?); see {log_path}") from None


def own_command(module_name: str) -> StageCommand:
    """A command that is not one gated stage: ``module_name``'s ``add_arguments`` and ``command``
    (``gonogo serve`` holds a server in the foreground until Ctrl-C; there is nothing to gate)."""
    import importlib

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        importlib.import_module(module_name).add_arguments(parser)

    def instead(args: argparse.Namespace) -> Optional[int]:
        return int(importlib.import_module(module_name).command(args) or 0)

    return StageCommand(add_arguments=add_arguments, instead=instead)
