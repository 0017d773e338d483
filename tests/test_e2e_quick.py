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

EXPECTED_KINDS = {"doctor", "collectives", "train", "drill", "scale", "finetune", "eval", "quantize",
                  "serve", "loadtest", "canary", "capacity"}


def test_laptop_and_quick_plans_have_every_stage_kind():
    for name in ("laptop", "quick"):
        kinds = {stage.kind.name for stage in load_plan(resolve_plan_path(name)).stages}
        assert kinds == EXPECTED_KINDS, (name, EXPECTED_KINDS ^ kinds)


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
