"""The whole path end to end: the built-in quick plan (every stage of the laptop plan, smaller).

Runs `gonogo run quick` for real (torchrun, gloo, servers on 127.0.0.1), then checks the verdict,
every stage, the assumptions register, and the report in headless Chromium (a screenshot at 1280 px
is saved in tests/artifacts/ for a person to look at).
"""

import json

import pytest

from gonogo.plan import load_plan, resolve_plan_path
from tests.conftest import run_gonogo
from tests.report.browser import check_report

# the stage kinds the default plan leaves out, and why; every other kind is in it
NOT_IN_LAPTOP = {
    "command": "runs the user's own program",
    "memory": "a memory probe means something against the user's cap (train.memory_cap_GB) or a GPU's memory",
    # its peak saturates two CPU-bound replicas on 2 shared cores now and then (p95 8.7 s in one
    # quiet laptop run): it lives in the ops plan
    "autoscale": "in the ops plan (gonogo run ops)",
}
QUICK_LEAVES_OUT = {"soak"}  # the ops stage (about 50 s): quick is the suite's end-to-end plan


def test_laptop_and_quick_plans_have_every_stage_kind():
    from gonogo.stages import kind_names

    def kinds(name):
        return {stage.kind.name for stage in load_plan(resolve_plan_path(name)).stages}

    laptop = kinds("laptop")
    assert laptop == set(kind_names()) - set(NOT_IN_LAPTOP), set(kind_names()) ^ laptop
    assert kinds("quick") == laptop - QUICK_LEAVES_OUT


@pytest.mark.slow
def test_quick_plan_is_go_end_to_end(tmp_path):
    out = tmp_path / "quick"
    result = run_gonogo("run", "quick", "--out", out, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "GO"
    assert all(stage["status"] == "passed" for stage in summary["stages"])
    assert summary["gates"] and all(gate["passed"] for gate in summary["gates"])
    statuses = {a["key"]: a["status"] for a in summary["assumptions"]}
    assert set(statuses.values()) <= {"validated", "refuted", "untested"}
    assert statuses["device_hours"] == "validated"
    for name in ("plan.toml", "state.json", "events.jsonl", "environment.json", "report.html"):
        assert (out / name).is_file(), name
    assert list((out / "checkpoints" / "pretrain").glob("step-*/COMMITTED"))
    checked = check_report(out / "report.html", "report-quick-1280.png")
    assert checked["failed"] == [] and checked["outside_requests"] == []
    assert len(checked["images"]) >= 5 and all(image["ok"] for image in checked["images"])
    assert "GO" in checked["title"]
