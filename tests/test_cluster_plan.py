"""`gonogo run` on a doctor + collectives plan, end to end with real torchrun processes."""

import json

from tests.conftest import run_gonogo

PLAN = """
[plan]
name = "bring-up"

[[stage]]
name = "doctor"
kind = "doctor"
storage_size_MB = 8
gates = ["disk_free_GB > 0", "storage_write_GBps > 0", "{doctor_gate}"]

[[stage]]
name = "collectives"
kind = "collectives"
nproc = 2
min_bytes = "1K"
max_bytes = "16K"
factor = 4
iters = 3
warmup = 1
ops = ["all_reduce", "all_gather"]
gates = ["wrong_total == 0", "all_reduce_busbw_GBps > 0"]

[assumptions]
storage_write_GBps = ">= 10"
tcp_retransmit_pct = "< 1"
"""


def test_doctor_and_collectives_plan_is_go(write_plan, tmp_path):
    plan = write_plan(PLAN.format(doctor_gate="cpu_count >= 1"))
    out = tmp_path / "run"
    result = run_gonogo("run", plan, "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "GO"
    assert all(g["passed"] for g in summary["gates"]) and len(summary["gates"]) == 5
    statuses = {a["key"]: a["status"] for a in summary["assumptions"]}
    assert statuses["tcp_retransmit_pct"] in ("validated", "refuted")
    assert statuses["storage_write_GBps"] in ("validated", "refuted")   # measured either way, never untested
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html.replace("http://www.w3.org", "")
    assert (out / "stages" / "collectives" / "collectives.json").is_file()
    rebuilt = run_gonogo("report", out)
    assert rebuilt.returncode == 0 and "GO" in rebuilt.stdout


def test_impossible_gate_is_no_go(write_plan, tmp_path):
    plan = write_plan(PLAN.format(doctor_gate="cpu_count >= 100000"))
    out = tmp_path / "run"
    result = run_gonogo("run", plan, "--out", out)
    assert result.returncode == 1, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "NO-GO"
    assert "cpu_count >= 100000" in summary["reasons"][0]
    assert [s["status"] for s in summary["stages"]] == ["failed", "not run"]
