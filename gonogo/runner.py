"""Runs a validated plan stage by stage, gates after each, into a run directory.

The runner owns the run directory's plan.toml, state.json (for ``--resume``) and the verdict;
each stage owns ``stages/<name>/``. Ctrl-C and SIGTERM stop the running stage (its child process
groups are stopped by ``gonogo.procs``), mark it interrupted and leave a run that ``--resume``
continues.
"""

from __future__ import annotations

import logging
import os
import platform
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import tomli_w

from gonogo import __version__
from gonogo.budget import Budget, Watchdog
from gonogo.errors import StageFailed, UserError
from gonogo.gates import GateResult, format_value, parse_gate
from gonogo.plan import Plan, PlanHeader, Stage, load_plan
from gonogo.files import write_atomic
from gonogo.rundir import RunDir, write_json_atomic
from gonogo.stages.base import StageContext, StageKind, StageSettings

log = logging.getLogger(__name__)

PASSED, FAILED, ERROR, INTERRUPTED, SKIPPED, NOT_RUN, RUNNING = (
    "passed", "failed", "error", "interrupted", "skipped", "not run", "running")
GO, NO_GO = "GO", "NO-GO"


class Observer(Protocol):
    def stage_started(self, stage: Stage, index: int, total: int) -> None: ...
    def stage_progress(self, stage: Stage, text: str) -> None: ...
    def stage_finished(self, stage: Stage, record: dict[str, Any]) -> None: ...


class SilentObserver:
    def stage_started(self, stage: Stage, index: int, total: int) -> None:
        pass

    def stage_progress(self, stage: Stage, text: str) -> None:
        pass

    def stage_finished(self, stage: Stage, record: dict[str, Any]) -> None:
        pass


@dataclass
class Outcome:
    verdict: str
    reasons: list[str]
    run_dir: RunDir
    exit_code: int
    summary: dict[str, Any] = field(default_factory=dict)


def resolved_plan_toml(plan: Plan) -> str:
    """The plan as run: every stage's settings with their defaults filled in."""
    stages = []
    for stage in plan.stages:
        entry: dict[str, Any] = {"name": stage.name, "kind": stage.kind.name}
        if stage.description:
            entry["description"] = stage.description
        entry.update(stage.settings.model_dump(mode="json", exclude_none=True))
        entry["gates"] = [gate.text for gate in stage.gates]
        entry["continue_on_fail"] = stage.continue_on_fail
        stages.append(entry)
    data: dict[str, Any] = {"plan": plan.header.model_dump(mode="json", exclude_none=True), "stage": stages}
    if plan.raw.get("assumptions"):
        data["assumptions"] = plan.raw["assumptions"]
    return tomli_w.dumps(data)


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "gonogo": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "argv": sys.argv,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_available"] = bool(torch.cuda.is_available())
    except Exception as error:  # pragma: no cover - torch is a dependency
        info["torch"] = f"unavailable: {error}"
    return info


class _SignalsToInterrupt:
    """While active, SIGTERM is handled like Ctrl-C (KeyboardInterrupt in the main thread), and so
    is SIGINT even where it was ignored: a shell starts a background job (``gonogo run ... &`` in a
    script, ``nohup``) with SIGINT ignored, and the budget watchdog's kill is a SIGINT to the main
    thread, which must stop the stage however the runner was started."""

    def __enter__(self) -> "_SignalsToInterrupt":
        self._previous: dict[int, Any] = {}
        try:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handler)
            if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
                self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not in the main thread (tests may run the runner in a thread)
            pass
        return self

    @staticmethod
    def _handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc: Any) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)


def check_stage_names(plan: Plan, only: Optional[set[str]], skip: Optional[set[str]]) -> None:
    names = {stage.name for stage in plan.stages}
    for chosen, flag in ((only, "--only"), (skip, "--skip")):
        unknown = sorted((chosen or set()) - names)
        if unknown:
            raise UserError(f"{flag}: no stage named {unknown[0]!r} in plan {plan.name!r}; "
                            f"stages: {', '.join(s.name for s in plan.stages)}")
    # and what the chosen stages need from this machine, before the run directory exists
    for stage in plan.stages:
        if (only is None or stage.name in only) and stage.name not in (skip or set()):
            stage.kind.preflight(stage.settings)


def run_plan(
    plan: Plan,
    run_dir: RunDir,
    *,
    only: Optional[set[str]] = None,
    skip: Optional[set[str]] = None,
    resume: bool = False,
    observer: Optional[Observer] = None,
    resume_hint: str = "continue with --resume",
) -> Outcome:
    """Run ``plan`` into ``run_dir``. ``resume_hint``: what an interrupted stage's record tells
    the user to do next."""
    observer = observer or SilentObserver()
    check_stage_names(plan, only, skip)

    state = run_dir.read_state() if resume else {"stages": {}}
    state.setdefault("stages", {})
    state.update({"plan": plan.name, "plan_dir": str(plan.path.parent.resolve())})
    if not resume:
        write_atomic(run_dir.plan_path, resolved_plan_toml(plan))
        write_json_atomic(run_dir.root / "environment.json", environment())
    state["attempts"] = state.get("attempts", 0) + 1
    run_dir.write_state(state)

    cleanups: list = []
    budget = Budget.of(plan.header)
    stopped_by: Optional[str] = None
    plan_started = time.monotonic()
    try:
        with _SignalsToInterrupt():
            for index, stage in enumerate(plan.stages):
                previous = state["stages"].get(stage.name, {})
                wanted = (only is None or stage.name in only) and stage.name not in (skip or set())
                if stopped_by is not None:
                    if previous.get("status") != PASSED:
                        state["stages"][stage.name] = {**previous, "status": NOT_RUN, "reason": stopped_by}
                    continue
                if resume and previous.get("status") == PASSED:
                    continue  # done in an earlier attempt; its metrics stay in its folder
                if not wanted:
                    if previous.get("status") != PASSED:
                        state["stages"][stage.name] = {**previous, "status": SKIPPED}
                    continue
                used = sum(float(s.get("device_hours") or 0.0) for s in state["stages"].values())
                limit = budget.limit_hours
                if limit is not None and used >= limit:
                    stopped_by = _budget_kill(run_dir, state, budget, used, stage.name, before=True)
                    state["stages"][stage.name] = {"status": NOT_RUN, "reason": stopped_by}
                    continue
                record = _run_stage(plan, stage, index, run_dir, observer, cleanups,
                                    None if limit is None else limit - used, previous,
                                    _watchdog(run_dir, state, budget, used, stage), resume_hint)
                state["stages"][stage.name] = record
                run_dir.write_state(state)
                observer.stage_finished(stage, record)
                if record.get("budget_kill"):
                    stopped_by = record["reason"]
                    continue
                if record["status"] == INTERRUPTED:
                    break
                if record["status"] != PASSED and not stage.continue_on_fail:
                    stopped_by = f"stage {stage.name!r} {record['status']}"
    finally:
        for cleanup in reversed(cleanups):
            try:
                cleanup()
            except Exception:  # a failing cleanup must not hide the plan's result
                log.exception("cleanup after the plan failed")
        state["wall_seconds"] = state.get("wall_seconds", 0.0) + (time.monotonic() - plan_started)
        run_dir.write_state(state)

    from gonogo.report.build import build_report

    summary = build_report(run_dir)
    verdict = summary["verdict"]
    from gonogo.report.summary import EXIT_CODES

    exit_code = EXIT_CODES.get(verdict, 1)
    return Outcome(verdict, summary["reasons"], run_dir, exit_code, summary)


def _budget_kill(run_dir: RunDir, state: dict[str, Any], budget: Budget, spent: float, stage: str, *,
                 before: bool) -> str:
    """Record the kill (event + state); the reason every later stage is not run for."""
    when = "before" if before else "during"
    reason = f"budget kill {when} stage {stage!r}: {budget.describe(spent)} (the plan's {budget.binding} budget)"
    if not state.get("budget", {}).get("kill"):
        run_dir.event("plan", event="budget_kill", at_stage=stage, reason=reason, **budget.event_fields(spent))
        state.setdefault("budget", {})["kill"] = {"stage": stage, "reason": reason, "time": time.time(),
                                                  **budget.event_fields(spent)}
        run_dir.write_state(state)
    log.warning("%s", reason)
    return reason


def _watchdog(run_dir: RunDir, state: dict[str, Any], budget: Budget, used: float, stage: Stage) -> Watchdog:
    """The budget watch over one stage: the alarm event at the fraction, the kill at the limit."""
    budget_state = state.setdefault("budget", {})

    def on_alarm(spent: float) -> None:
        fraction = budget.fraction(spent)
        run_dir.event("plan", event="budget_alarm", at_stage=stage.name, alarm_fraction=budget.alarm_fraction,
                      reason=f"cost alarm: {budget.describe(spent)}, past {budget.alarm_fraction:.0%} of the budget",
                      **budget.event_fields(spent))
        budget_state["alarm"] = {"stage": stage.name, "time": time.time(), "fraction": fraction,
                                 **budget.event_fields(spent)}

    def on_kill(spent: float) -> None:
        _budget_kill(run_dir, state, budget, spent, stage.name, before=False)

    watchdog = Watchdog(budget, used, stage.kind.devices(stage.settings), alarm_raised="alarm" in budget_state,
                        on_alarm=on_alarm, on_kill=on_kill)
    if budget.limit_hours is not None and "alarm" not in budget_state \
            and used >= budget.alarm_fraction * budget.limit_hours:
        watchdog.alarm_raised = True
        on_alarm(used)
    return watchdog


def _run_stage(plan: Plan, stage: Stage, index: int, run_dir: RunDir, observer: Observer,
               cleanups: list, budget_left: Optional[float], previous: dict[str, Any],
               watchdog: Optional[Watchdog] = None,
               resume_hint: str = "continue with --resume") -> dict[str, Any]:
    stage_dir = run_dir.stage_dir(stage.name, create=False)
    if stage_dir.exists() and any(stage_dir.iterdir()):
        # an earlier attempt's files are kept, never overwritten
        attempt = 1
        while (stage_dir.parent / f"{stage.name}.attempt-{attempt}").exists():
            attempt += 1
        stage_dir.rename(stage_dir.parent / f"{stage.name}.attempt-{attempt}")
    stage_dir.mkdir(parents=True, exist_ok=True)

    context = StageContext(
        name=stage.name, kind=stage.kind.name, run_dir=run_dir, stage_dir=stage_dir,
        budget_left_hours=budget_left, price_per_device_hour=plan.header.price_per_device_hour,
        plan_dir=plan.path.parent.resolve(),
        on_progress=lambda text: observer.stage_progress(stage, text), plan_cleanups=cleanups)
    observer.stage_started(stage, index, len(plan.stages))
    run_dir.event(stage.name, event="stage_start", kind=stage.kind.name)
    started = time.monotonic()
    record: dict[str, Any] = {"kind": stage.kind.name, "started": time.time()}
    metrics: dict[str, Any] = {}
    if watchdog is not None:
        watchdog.start()
    try:
        try:
            metrics = dict(stage.kind.run(context, stage.settings) or {})
            status, reason = PASSED, ""
        finally:
            if watchdog is not None:
                watchdog.disarm()
    except KeyboardInterrupt:
        if watchdog is not None:
            watchdog.disarm()  # again: a kill arriving inside the first one cut it short
        status, reason = INTERRUPTED, f"interrupted (Ctrl-C or SIGTERM); {resume_hint}"
    except UserError as error:
        status, reason = ERROR, str(error)
        record["user_error"] = True
    except StageFailed as error:
        status, reason = FAILED, str(error)
    except Exception as error:
        (stage_dir / "error.log").write_text(traceback.format_exc(), encoding="utf-8")
        status, reason = ERROR, f"{type(error).__name__}: {error} (traceback in {stage_dir / 'error.log'})"
    killed = watchdog is not None and watchdog.fired
    if killed:
        # the kill, however the stage took it (stopped mid-way, or ended on its own meanwhile)
        status, reason = FAILED, run_dir.read_state().get("budget", {}).get("kill", {}).get("reason", "budget kill")
    seconds = time.monotonic() - started
    device_hours = seconds / 3600.0 * max(1, stage.kind.devices(stage.settings))
    metrics["stage_wall_seconds"] = round(seconds, 3)
    metrics["stage_device_hours"] = device_hours
    if status != INTERRUPTED:  # an interrupted stage measured nothing and claims nothing
        write_json_atomic(stage_dir / "metrics.json", metrics)
    run_dir.event(stage.name, event="stage_end", status=status, seconds=seconds,
                  metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float, bool, str))})

    gate_results: list[GateResult] = [gate.evaluate(metrics) for gate in stage.gates]
    if not killed and status == PASSED and not all(result.passed for result in gate_results):
        status = FAILED
        failed = [r for r in gate_results if not r.passed]
        reason = "; ".join(
            f"gate {r.gate.text!r} " + (r.reason if r.measured is None else f"measured {format_value(r.measured)}")
            for r in failed)
    record.update({
        "status": status, "reason": reason, "wall_seconds": seconds, "device_hours": device_hours,
        "gates": [{"expression": r.gate.text, "measured": r.measured, "passed": r.passed, "reason": r.reason}
                  for r in gate_results],
    })
    if stage.continue_on_fail:
        record["continue_on_fail"] = True
    if killed:
        record["budget_kill"] = True
    return record


def one_stage_plan(kind: StageKind, settings: StageSettings, *, name: Optional[str] = None,
                   gates: Optional[Sequence[str]] = None, plan_name: Optional[str] = None) -> Plan:
    """A plan of one stage, in memory: what ``gonogo <kind>`` runs. ``gates``: the kind's default
    gates unless given. Relative paths in the settings are relative to the current folder."""
    name = name or kind.name
    stage = Stage(name, kind, settings, [], False, "", {})
    for text in (kind.default_gates(settings) if gates is None else gates):
        gate = parse_gate(text)
        assert gate.metric in stage.metrics, f"kind {kind.name!r}: gate {text!r} reads a metric it does not produce"
        stage.gates.append(gate)
    header = PlanHeader(name=plan_name or kind.name)
    return Plan(header, [stage], [], Path.cwd() / "plan.toml", {})


def run_stage_alone(kind: StageKind, settings: StageSettings, *, out: Optional[Path] = None,
                    run_dir: Optional[RunDir] = None, observer: Optional[Observer] = None,
                    gates: Optional[Sequence[str]] = None,
                    resume_hint: Optional[Callable[[RunDir], str]] = None) -> Outcome:
    """One stage through the same runner as a plan: same run directory layout, gates, report and
    exit codes. ``run_dir``: an existing run directory to continue in, else a new one at ``out``;
    ``gates``: the kind's default gates unless given."""
    plan = one_stage_plan(kind, settings, gates=gates)
    check_stage_names(plan, None, None)  # the kind's preflight, before the run directory exists
    if run_dir is None:
        run_dir = RunDir.create(out, plan.name)
    return run_plan(plan, run_dir, observer=observer,
                    resume_hint=resume_hint(run_dir) if resume_hint is not None
                    else f"continue with: gonogo run --resume --out {run_dir.root}")


def check_gpus(plan: Plan) -> None:
    """A plan written for GPUs stops here, before it creates anything, on a machine without them."""
    needed = plan.header.requires_gpus
    if not needed:
        return
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < needed:
        raise UserError(f"plan {plan.name!r} needs {needed} CUDA GPU(s) and torch {torch.__version__} sees "
                        f"{visible} here: run it on a GPU machine (bench/gpu_smoke.sh installs and runs it), "
                        "or run the laptop plan")


def cli_run(plan_arg: Optional[str], out: Optional[Path], only: Optional[set[str]], skip: Optional[set[str]],
            resume: bool, observer: Optional[Observer] = None,
            parameters: Optional[dict[str, str]] = None) -> Outcome:
    """What ``gonogo run`` does, minus the printing. ``parameters``: the plan's name=value words
    (a resumed run needs none: its plan.toml holds the values it ran with)."""
    from gonogo.plan import resolve_plan_path

    if resume:
        if out is not None:
            run_dir = RunDir.open(out)
        else:
            name = load_plan(resolve_plan_path(plan_arg), parameters).name
            run_dir = RunDir.newest(name)
        state = run_dir.read_state()
        plan_source = Path(state.get("plan_dir", ".")) / "plan.toml"
        plan = load_plan(run_dir.plan_path)
        check_gpus(plan)
        # relative paths in the plan are relative to the original plan's folder
        plan.path = plan_source
        return run_plan(plan, run_dir, only=only, skip=skip, resume=True, observer=observer)
    plan = load_plan(resolve_plan_path(plan_arg), parameters)
    check_stage_names(plan, only, skip)
    check_gpus(plan)
    run_dir = RunDir.create(out, plan.name)
    return run_plan(plan, run_dir, only=only, skip=skip, resume=False, observer=observer)
