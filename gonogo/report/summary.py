"""The verdict and summary.json, computed from the run directory alone.

Verdicts: GO (every stage of the plan ran and every gate passed), NO-GO (a stage failed, or a gate
failed or was not measured), INCOMPLETE (nothing failed, but stages of the plan did not run:
skipped with --only/--skip, or not reached), INTERRUPTED, ERROR (a mistake in the input).
A plan is only GO as a whole: a run that left stages out never is.
"""

from __future__ import annotations

import json
from typing import Any

from gonogo.budget import Budget
from gonogo.gates import UNKNOWN_KEY
from gonogo.plan import Plan
from gonogo.rundir import RunDir

PASSED, FAILED, ERROR, INTERRUPTED, SKIPPED, NOT_RUN = (
    "passed", "failed", "error", "interrupted", "skipped", "not run")
GO, NO_GO, INCOMPLETE = "GO", "NO-GO", "INCOMPLETE"
EXIT_CODES = {GO: 0, NO_GO: 1, INCOMPLETE: 1, "ERROR": 2, "INTERRUPTED": 130}


def _environment(run_dir: RunDir) -> dict[str, Any]:
    path = run_dir.root / "environment.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def summarize(plan: Plan, run_dir: RunDir) -> dict[str, Any]:
    state = run_dir.read_state()
    records = state.get("stages", {})
    stages: list[dict[str, Any]] = []
    gates: list[dict[str, Any]] = []
    reasons: list[str] = []
    notes: list[str] = []
    not_run: list[dict[str, Any]] = []
    for stage in plan.stages:
        record = records.get(stage.name, {"status": NOT_RUN, "reason": "not started"})
        status = record.get("status", NOT_RUN)
        metrics = run_dir.stage_metrics(stage.name) if status not in (SKIPPED, NOT_RUN) else {}
        stage_gates = []
        for gate in stage.gates:
            evaluated = next((g for g in record.get("gates", []) if g["expression"] == gate.text), None)
            entry = {
                "stage": stage.name, "expression": gate.text, "metric": gate.metric,
                "measured": evaluated["measured"] if evaluated else None,
                "passed": bool(evaluated and evaluated["passed"]),
                "status": ("pass" if evaluated["passed"] else "fail") if evaluated else "not evaluated",
                # "not measured: <why>" for a gate on a metric the stage could not measure
                "reason": (evaluated.get("reason") or "") if evaluated else f"stage {status}",
            }
            stage_gates.append(entry)
            gates.append(entry)
        stages.append({
            "name": stage.name, "kind": stage.kind.name, "description": stage.description or stage.kind.description,
            "status": status, "reason": record.get("reason", ""),
            "wall_seconds": record.get("wall_seconds"), "device_hours": record.get("device_hours"),
            "continue_on_fail": stage.continue_on_fail, "gates": stage_gates, "metrics": metrics,
        })
        if status in (SKIPPED, NOT_RUN):
            why = "skipped (--only/--skip)" if status == SKIPPED else (record.get("reason") or "not reached")
            not_run.append({"stage": stage.name, "status": status, "reason": why})
        elif status != PASSED:
            detail = record.get("reason") or status
            reasons.append(f"stage {stage.name!r} {status}: {detail}")

    device_hours = sum(float(r.get("device_hours") or 0.0) for r in records.values())
    budget = Budget.of(plan.header)
    budget_section = _budget(budget, device_hours, state)
    plan_metrics = {"device_hours": device_hours, "wall_seconds": state.get("wall_seconds"),
                    "cost": budget_section["cost"], "budget_used_fraction": budget_section["used_fraction"]}
    assumptions = []
    by_name = {s["name"]: s for s in stages}
    for assumption in plan.assumptions:
        source = plan.assumption_source(assumption)
        if source is None:
            measured = plan_metrics.get(assumption.metric)
        else:
            measured = by_name[source]["metrics"].get(assumption.metric)
        why = ""
        if measured is None:
            if source is None:
                why = "not measured by the plan"
            else:
                unknown = by_name[source]["metrics"].get(UNKNOWN_KEY) or {}
                why = unknown.get(assumption.metric) or (
                    f"stage {source!r} {by_name[source]['status']}" if by_name[source]["status"] != PASSED
                    else f"stage {source!r} did not measure it")
        assumptions.append(assumption.evaluate(measured, source or "plan", why))
    assumptions.extend(_budget_assumptions(budget, budget_section))
    if budget_section["kill"]:
        reasons.insert(0, budget_section["kill"]["reason"])

    statuses = [s["status"] for s in stages]
    if INTERRUPTED in statuses:
        verdict = "INTERRUPTED"
        reasons.insert(0, "the run was interrupted; continue it with gonogo run --resume --out " + str(run_dir.root))
    elif any(records.get(s.name, {}).get("user_error") for s in plan.stages):
        verdict = "ERROR"
    elif reasons:
        verdict = NO_GO
    elif not_run:
        verdict = INCOMPLETE
    else:
        verdict = GO
    if not_run and verdict != "INTERRUPTED":
        # a plan is proved as a whole: say which of its stages this run did not prove
        reasons.append(f"{len(not_run)} of {len(stages)} stages not run: " + "; ".join(
            f"{entry['stage']} ({entry['reason']})" for entry in not_run))
        if verdict == INCOMPLETE:
            reasons.append("nothing that ran failed, but the plan is not proved; run the missing stages with "
                           "gonogo run --resume --out " + str(run_dir.root))
    budget_hours = plan.header.budget_device_hours
    summary = {
        "verdict": verdict,
        "reasons": reasons,
        "notes": notes,
        "not_run": not_run,
        "plan": {
            "name": plan.name, "description": plan.header.description, "budget_device_hours": budget_hours,
            "device_hours_used": device_hours, "wall_seconds": state.get("wall_seconds"),
            "attempts": state.get("attempts", 1),
        },
        "budget": budget_section,
        "gates": gates,
        "assumptions": assumptions,
        "stages": stages,
        "environment": _environment(run_dir),
        "run_dir": str(run_dir.root),
    }
    from gonogo.report.ops import operations

    summary.update(operations(plan, run_dir, summary))
    return summary


def _budget(budget: Budget, device_hours: float, state: dict[str, Any]) -> dict[str, Any]:
    """The cost alarms as run: limits, spend, and the alarm and kill events (from state.json)."""
    recorded = state.get("budget", {})
    return {
        "price_per_device_hour": budget.price, "currency": budget.currency, "budget_money": budget.money,
        "budget_device_hours": budget.device_hours, "limit_device_hours": budget.limit_hours,
        "binding": budget.binding, "alarm_fraction": budget.alarm_fraction,
        "cost": budget.cost(device_hours), "used_fraction": budget.fraction(device_hours),
        "alarm": recorded.get("alarm"), "kill": recorded.get("kill"),
    }


def _budget_assumptions(budget: Budget, section: dict[str, Any]) -> list[dict[str, Any]]:
    """The alarm and the kill as rows of the assumptions register: "the plan stays under them"."""
    if budget.limit_hours is None:
        return []
    rows = []
    unit = f"{budget.binding} budget"
    for key, threshold, event, note in (
            ("budget_alarm", budget.alarm_fraction, section["alarm"],
             f"cost alarm at {budget.alarm_fraction:.0%} of the {unit} ([plan] budget_alarm_fraction)"),
            ("budget_kill", 1.0, section["kill"], f"kill at 100% of the {unit}: the plan stops")):
        used = section["used_fraction"]
        status = "refuted" if event else "validated"
        rows.append({"key": key, "hypothesis": f"budget_used_fraction < {threshold:g}",
                     "measured": None if used is None else round(used, 4), "source_stage": "plan",
                     "status": status, "note": note,
                     "reason": (event or {}).get("reason") or (f"fired at stage {event['stage']!r}" if event else "")})
    return rows
