"""The rollback policy and the sign-off checklist, rebuilt by `gonogo report` from a run directory alone."""

import json
import time

from tests.conftest import run_gonogo

PLAN = '''
[plan]
name = "ops"
price_per_device_hour = 2.0
budget_money = 10.0

[[stage]]
name = "doctor"
kind = "doctor"
gates = ["healthy == true"]

[[stage]]
name = "pretrain"
kind = "train"
stop_and_resume_at = 4
gates = ["stopped_and_resumed == true"]

[[stage]]
name = "canary"
kind = "canary"
stable = "http://127.0.0.1:1"
canary = "http://127.0.0.1:2"
analysis = { threshold = 3, thresholds = { success_rate = 0.95, ttft_p99_ms = 800 } }
gates = ["promoted == true"]

[[stage]]
name = "collectives"
kind = "collectives"
gates = ["wrong_total == 0"]

[[stage]]
name = "finetune"
kind = "finetune"
checkpoint = "@pretrain"
'''


def make_run(root, statuses, metrics, events, budget=None):
    (root / "stages").mkdir(parents=True)
    (root / "plan.toml").write_text(PLAN)
    state = {"plan": "ops", "attempts": 1, "wall_seconds": 10.0, "stages": {}}
    for name, status in statuses.items():
        state["stages"][name] = {"kind": name, "status": status, "reason": "" if status == "passed" else "x",
                                 "device_hours": 0.001, "gates": []}
        if status not in ("not run", "skipped"):
            (root / "stages" / name).mkdir()
            (root / "stages" / name / "metrics.json").write_text(json.dumps(metrics.get(name, {})))
    if budget:
        state["budget"] = budget
    (root / "state.json").write_text(json.dumps(state))
    (root / "events.jsonl").write_text("".join(json.dumps({"time": time.time(), **e}) + "\n" for e in events))
    (root / "stages" / "pretrain" / "job.json").write_text(json.dumps(
        {"config": {"train": {"spike_factor": 5.0, "max_rollbacks": 3}}}))
    return root


def test_the_report_lists_the_rollback_policy_with_what_fired_and_ticks_the_checklist(tmp_path):
    run = make_run(tmp_path / "run", {"doctor": "passed", "pretrain": "passed", "canary": "failed",
                                      "collectives": "not run", "finetune": "passed"},
                   {"pretrain": {"rollbacks": 1, "stopped_and_resumed": True},
                    "canary": {"rolled_back": True, "promoted": False, "failed_checks": 3}},
                   [{"stage": "pretrain", "event": "loss_guard", "step": 7, "reason": "loss is nan",
                     "rolled_back_to": 4, "rollback": 1},
                    {"stage": "canary", "weight": 0, "rolled_back": True, "failed_checks": 3}])
    result = run_gonogo("report", run)
    assert result.returncode == 1, result.stdout + result.stderr
    summary = json.loads((run / "summary.json").read_text())
    rules = {r["rule"]: r for r in summary["rollback_policy"] if r["stage"] != "finetune"}
    assert rules["canary rollback"]["fired"] is True
    assert "after 3 failed checks" in rules["canary rollback"]["policy"]
    assert "success_rate >= 0.95" in rules["canary rollback"]["policy"]
    assert "ttft_p99_ms <= 800" in rules["canary rollback"]["policy"]
    guard = rules["training loss-guard rollback"]
    assert guard["fired"] is True and "5× the running median" in guard["policy"] and "step 7" in guard["detail"]
    assert rules["budget kill"]["fired"] is False and "10 USD at 2 per device-hour" in rules["budget kill"]["policy"]
    finetune = next(r for r in summary["rollback_policy"] if r["stage"] == "finetune")
    assert finetune["rule"] == "training loss-guard rollback" and finetune["fired"] is None  # no job.json, no count
    items = {c["key"]: c for c in summary["checklist"]}
    assert [c["key"] for c in summary["checklist"]] == [
        "hardware", "collectives", "pretrain", "finetune", "canary", "autoscaling", "retention", "cost-alarms"]
    assert items["hardware"]["status"] == "ticked" and items["hardware"]["evidence"] == ["#stage-doctor"]
    assert items["pretrain"]["status"] == "ticked"             # the train stage's stop-and-resume gate passed
    assert items["collectives"]["status"] == "open" and "not run" in items["collectives"]["why"]
    assert items["canary"]["status"] == "not ticked" and "canary failed" in items["canary"]["why"]
    assert items["finetune"]["status"] == "open" and "finetune has no gates" in items["finetune"]["why"]
    assert "no stage of this plan: an eval stage" in items["finetune"]["why"]
    assert items["cost-alarms"]["status"] == "ticked"
    html = (run / "report.html").read_text()
    assert "Rollback policy" in html and "Operational checklist" in html
    assert html.rindex("Operational checklist") > html.rindex("Environment")  # the report ends with it


def test_nothing_recorded_is_unknown_not_quiet(tmp_path):
    run = make_run(tmp_path / "run", {"doctor": "passed", "pretrain": "failed", "canary": "not run",
                                      "collectives": "passed", "finetune": "not run"}, {}, [],
                   budget={"kill": {"stage": "pretrain", "reason": "budget kill during stage 'pretrain': x"}})
    run_gonogo("report", run)
    summary = json.loads((run / "summary.json").read_text())
    rules = {r["rule"]: r for r in summary["rollback_policy"] if r["stage"] != "finetune"}
    assert rules["training loss-guard rollback"]["fired"] is None   # no rollback count: unknown, not "not fired"
    assert rules["canary rollback"]["fired"] is None and "not run" in rules["canary rollback"]["detail"]
    assert rules["budget kill"]["fired"] is True
    items = {c["key"]: c for c in summary["checklist"]}
    assert items["pretrain"]["status"] == "not ticked" and items["cost-alarms"]["status"] == "not ticked"
    assert summary["verdict"] == "NO-GO" and summary["reasons"][0].startswith("budget kill")
