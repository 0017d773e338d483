"""The operations view of a run: its rollback policy (what would roll back, and what did) and the
playbook's sign-off checklist, ticked from the gates this run measured.

Everything here is read from the run directory alone (plan.toml as run, state.json, events.jsonl,
each stage's metrics.json and job.json), so ``gonogo report RUN_DIR`` rebuilds it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from gonogo.events import Event
from gonogo.plan import Plan, Stage
from gonogo.rundir import RunDir

log = logging.getLogger(__name__)

PASSED, SKIPPED, NOT_RUN = "passed", "skipped", "not run"
TICKED, NOT_TICKED, OPEN = "ticked", "not ticked", "open"
RESTORE_DRILLS = {"kill", "torn-checkpoint"}


def _anchor(name: str) -> str:
    return f"#stage-{name}"


# -- rollback policy --------------------------------------------------------------------------

def settings_of(stage: Stage) -> Any:
    """The stage's own settings model (each rule below knows the kind it reads)."""
    return stage.settings


def _stage_status(summary: dict[str, Any], name: str) -> dict[str, Any]:
    return next(entry for entry in summary["stages"] if entry["name"] == name)


def _canary_rule(stage: Stage, entry: dict[str, Any], events: list[Event]) -> dict[str, Any]:
    analysis = settings_of(stage).analysis
    from gonogo.rollout.analysis import CHECKS

    checks = ", ".join(f"{name} {'>=' if CHECKS[name][0] == 'min' else '<='} {value:g}"
                       for name, value in analysis.thresholds.active().items()) or "none"
    rule = (f"weights {analysis.steps} %, {analysis.interval_s:g} s per step; roll back to 0 % after "
            f"{analysis.threshold} failed checks (checks: {checks}); drain {settings_of(stage).drain_timeout_s:g} s")
    metrics = entry["metrics"]
    rolled = [e for e in events if e.get("stage") == stage.name and e.get("rolled_back")]
    if entry["status"] in (SKIPPED, NOT_RUN):
        fired, detail = None, f"stage {entry['status']}"
    elif metrics.get("rolled_back") is None and not rolled:
        fired, detail = None, "the stage recorded no decision"
    else:
        fired = bool(metrics.get("rolled_back")) or bool(rolled)
        detail = (f"rolled back after {metrics.get('failed_checks')} failed checks" if fired
                  else "promoted" if metrics.get("promoted") else "halted" if metrics.get("halted") else "not fired")
    return {"rule": "canary rollback", "stage": stage.name, "policy": rule, "fired": fired, "detail": detail,
            "evidence": _anchor(stage.name)}


def _planned_train_settings(base: str, stage: Stage) -> dict[str, Any]:
    """The [train] table the stage would run with, from its config and overrides (a stage that
    did not run has no job.json; its rule is still known)."""
    from gonogo.train.config import load_train_config, overrides_list

    config = settings_of(stage).config
    if (config.endswith(".toml") or "/" in config) and not Path(config).is_absolute():
        config = str(Path(base) / config)  # relative to the original plan's folder, as the stage read it
    try:
        loaded, _ = load_train_config(config, overrides_list(settings_of(stage).overrides))
    except Exception as error:  # the preset moved since the run: the rule is unknown, said so
        log.info("train settings of stage %s unreadable: %s", stage.name, error)
        return {}
    return loaded.train.model_dump()


def _loss_guard_rule(stage: Stage, entry: dict[str, Any], run_dir: RunDir,
                     events: list[Event]) -> dict[str, Any]:
    job_path = run_dir.stage_dir(stage.name, create=False) / "job.json"
    train: dict[str, Any] = {}
    if job_path.is_file():
        try:
            train = json.loads(job_path.read_text(encoding="utf-8"))["config"]["train"]
        except (json.JSONDecodeError, KeyError, TypeError):
            train = {}
    if not train:
        train = _planned_train_settings(run_dir.read_state().get("plan_dir", "."), stage)
    spike, most = train.get("spike_factor"), train.get("max_rollbacks")
    if spike is None:
        policy = ("loss NaN or a spike → roll back to the newest committed checkpoint (settings unknown: no job.json "
                  "and the stage's config could not be read)")
    elif spike == 0:
        policy = "loss guard off (train.spike_factor = 0): NaN losses only"
    else:
        policy = (f"loss NaN or above {spike:g}× the running median → roll back to the newest committed checkpoint "
                  f"and skip the batch; the stage fails after {most} rollbacks")
    guard = [e for e in events if e.get("stage") == stage.name and e.get("event") == "loss_guard"]
    rollbacks = entry["metrics"].get("rollbacks")
    if entry["status"] in (SKIPPED, NOT_RUN):
        fired, detail = None, f"stage {entry['status']}"
    elif rollbacks is None and not guard:
        fired, detail = None, "the stage recorded no rollback count"
    else:
        count = max(len(guard), rollbacks or 0)
        fired = count > 0
        detail = (f"{count} rollback(s): " + "; ".join(
            f"step {e.get('step')}: {e.get('reason')} → step {e.get('rolled_back_to')}" for e in guard[:3])
            if fired else "not fired")
    return {"rule": "training loss-guard rollback", "stage": stage.name, "policy": policy, "fired": fired,
            "detail": detail, "evidence": _anchor(stage.name)}


def rollback_policy(plan: Plan, run_dir: RunDir, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rollback rule the plan carries, each with whether it fired (None: unknown / not run)."""
    events = run_dir.read_events()
    rules = []
    for stage in plan.stages:
        entry = _stage_status(summary, stage.name)
        if stage.kind.name == "canary":
            rules.append(_canary_rule(stage, entry, events))
        elif stage.kind.name in ("train", "finetune"):
            rules.append(_loss_guard_rule(stage, entry, run_dir, events))
    budget = summary["budget"]
    if budget["limit_device_hours"] is None:
        rules.append({"rule": "budget kill", "stage": "plan", "policy": "none: the plan sets no budget "
                      "(budget_device_hours, or budget_money with price_per_device_hour)", "fired": None,
                      "detail": "no limit", "evidence": "#cost-alarms"})
    else:
        money = (f"{budget['budget_money']:g} {budget['currency']} at {budget['price_per_device_hour']:g} "
                 f"per device-hour" if budget["budget_money"] is not None else None)
        hours = f"{budget['budget_device_hours']:g} device-hours" if budget["budget_device_hours"] else None
        policy = (f"alarm at {budget['alarm_fraction']:.0%}, kill at 100% of "
                  + " or ".join(part for part in (money, hours) if part) + ": the running stage is stopped, "
                  "no later stage runs")
        kill = budget["kill"]
        rules.append({"rule": "budget kill", "stage": "plan", "policy": policy, "fired": bool(kill),
                      "detail": kill["reason"] if kill else (
                          f"alarm fired during {budget['alarm']['stage']}; kill not fired" if budget["alarm"]
                          else "not fired"),
                      "evidence": "#cost-alarms"})
    return rules


# -- the sign-off checklist ---------------------------------------------------------------------

@dataclass(frozen=True)
class Part:
    what: str                                   # what a stage must prove, in words
    covers: Callable[[Stage], bool]


def _kind(*names: str) -> Callable[[Stage], bool]:
    return lambda stage: stage.kind.name in names


def _restore(stage: Stage) -> bool:
    if stage.kind.name == "train":
        return any(gate.metric == "stopped_and_resumed" for gate in stage.gates)
    if stage.kind.name == "drill":
        return bool(RESTORE_DRILLS & set(settings_of(stage).kinds))
    return False


def _canary_drill(stage: Stage) -> bool:
    return stage.kind.name == "drill" and "canary" in settings_of(stage).kinds


CHECKLIST: list[tuple[str, str, list[Part]]] = [
    ("hardware", "hardware inventory and topology", [Part("a doctor stage", _kind("doctor"))]),
    ("collectives", "collective smoke test", [Part("a collectives stage", _kind("collectives"))]),
    ("pretrain", "pretraining POC with checkpoint/restore", [
        Part("a train stage", _kind("train")),
        Part("a restore proof (a train stop_and_resumed gate or a kill/torn-checkpoint drill)", _restore)]),
    ("finetune", "finetune and benchmark report", [
        Part("a finetune stage", _kind("finetune")), Part("an eval stage", _kind("eval"))]),
    ("canary", "canary plan with gates and rollback rules", [
        Part("a canary stage with gates", lambda stage: stage.kind.name == "canary" and bool(stage.gates)),
        Part("a canary rollback drill", _canary_drill)]),
    ("autoscaling", "autoscaling triggers", [Part("an autoscale stage", _kind("autoscale"))]),
    ("retention", "checkpoint retention", [Part("a soak stage (checkpoints at a cadence with retention)",
                                                _kind("soak"))]),
]


def checklist(plan: Plan, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The playbook's sign-off items: ticked only when every part is covered by a stage that ran
    and passed its gates; not ticked when a covering stage failed; open when no stage proved it."""
    by_name = {entry["name"]: entry for entry in summary["stages"]}
    items = []
    for key, title, parts in CHECKLIST:
        evidence: list[str] = []
        missing: list[str] = []
        failed: list[str] = []
        for part in parts:
            stages = [stage for stage in plan.stages if part.covers(stage)]
            ran = [stage for stage in stages if by_name[stage.name]["status"] not in (SKIPPED, NOT_RUN)]
            evidence.extend(stage.name for stage in stages if stage.name not in evidence)
            if not stages:
                missing.append(f"no stage of this plan: {part.what}")
            elif not ran:
                missing.append(f"{part.what}: " + ", ".join(
                    f"{stage.name} {by_name[stage.name]['status']}" for stage in stages))
            failed.extend(f"{stage.name} {by_name[stage.name]['status']}" for stage in ran
                          if by_name[stage.name]["status"] != PASSED)
            # a stage with no gate measured nothing it could fail on: it proves no item
            missing.extend(f"{stage.name} has no gates" for stage in ran
                           if by_name[stage.name]["status"] == PASSED and not stage.gates)
        status = NOT_TICKED if failed else OPEN if missing else TICKED
        why = "; ".join(failed + missing) or "every covering stage passed its gates: " + ", ".join(evidence)
        items.append({"key": key, "item": title, "status": status, "why": why, "stages": evidence,
                      "evidence": [_anchor(name) for name in evidence]})
    items.append(_cost_item(summary["budget"]))
    return items


def _cost_item(budget: dict[str, Any]) -> dict[str, Any]:
    item = {"key": "cost-alarms", "item": "cost alarms", "stages": [], "evidence": ["#cost-alarms"]}
    if budget["limit_device_hours"] is None:
        return {**item, "status": OPEN, "why": "the plan sets no budget: no alarm and no kill were armed"}
    if budget["kill"]:
        return {**item, "status": NOT_TICKED, "why": budget["kill"]["reason"]}
    if budget["price_per_device_hour"] is None:
        return {**item, "status": OPEN, "why": "a device-hour budget was armed, but no price_per_device_hour: "
                                               "the spend was not measured in money"}
    return {**item, "status": TICKED, "why": f"alarm at {budget['alarm_fraction']:.0%} and kill at 100% armed; "
                                             f"{(budget['used_fraction'] or 0):.0%} of the budget spent"}


def operations(plan: Plan, run_dir: RunDir, summary: dict[str, Any]) -> dict[str, Any]:
    """Both views for summary.json; a failure here is logged and leaves them out, never the verdict."""
    result: dict[str, Any] = {}
    for key, build in (("rollback_policy", lambda: rollback_policy(plan, run_dir, summary)),
                       ("checklist", lambda: checklist(plan, summary))):
        try:
            result[key] = build()
        except Exception as error:  # the report must not be lost to a bug in a view of it
            log.exception("building %s failed", key)
            result[key] = {"unavailable": f"{type(error).__name__}: {error}"}
    return result
