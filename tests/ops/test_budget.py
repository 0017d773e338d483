"""Cost alarms through the real runner: the alarm event, the kill at 100%, the verdict; one price for capacity."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, run_gonogo

PY = sys.executable
WRITE = "import json, os; json.dump({'score': 1}, open(os.path.join(os.environ['GONOGO_STAGE_DIR'], 'metrics.out.json'), 'w'))"


def stage(name, code, gates=("score >= 1",)):
    return f'''
[[stage]]
name = "{name}"
kind = "command"
argv = ["{PY}", "-c", {json.dumps(code)}]
metrics = ["score"]
gates = {json.dumps(list(gates))}
'''


def events(out):
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def test_a_money_budget_too_small_stops_the_plan_at_the_kill(write_plan, tmp_path):
    # 3600 USD per device-hour = 1 USD per device-second: a 1.5 USD budget is 1.5 s of one device
    plan = write_plan("[plan]\nname = 'costly'\nprice_per_device_hour = 3600\nbudget_money = 1.5\n"
                      "budget_alarm_fraction = 0.5\n"
                      + stage("long", "import time; time.sleep(60)") + stage("after", WRITE))
    out = tmp_path / "run"
    started = time.monotonic()
    result = run_gonogo("run", plan, "--out", out, timeout=60)
    assert time.monotonic() - started < 30, "the kill did not stop the 60 s stage"
    assert result.returncode == 1, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "NO-GO"
    assert summary["reasons"][0].startswith("budget kill during stage 'long'")
    assert "of 1.5 USD spent" in summary["reasons"][0]
    long, after = summary["stages"]
    assert long["status"] == "failed" and long["reason"].startswith("budget kill")
    assert after["status"] == "not run" and after["reason"].startswith("budget kill")
    budget = summary["budget"]
    assert budget["binding"] == "money" and budget["kill"]["stage"] == "long"
    assert budget["alarm"]["stage"] == "long" and 0.5 <= budget["alarm"]["fraction"] < 1
    assert budget["cost"] >= 1.5 and budget["used_fraction"] >= 1
    names = [e["event"] for e in events(out) if e["stage"] == "plan"]
    assert names == ["budget_alarm", "budget_kill"]
    register = {row["key"]: row["status"] for row in summary["assumptions"]}
    assert register == {"budget_alarm": "refuted", "budget_kill": "refuted"}
    rules = {r["rule"]: r for r in summary["rollback_policy"]}
    assert rules["budget kill"]["fired"] is True and rules["budget kill"]["detail"] == summary["reasons"][0]
    assert {c["key"]: c["status"] for c in summary["checklist"]}["cost-alarms"] == "not ticked"
    html = (out / "report.html").read_text()
    assert "Cost alarms" in html and "budget kill during stage" in html


def test_the_kill_stops_a_runner_started_with_sigint_ignored(write_plan, tmp_path):
    """A shell starts a background job (``gonogo run ... &`` in a script, ``nohup``) with SIGINT
    ignored; the kill is a SIGINT to the runner's main thread and must stop the stage all the same."""
    plan = write_plan("[plan]\nname = 'costly'\nprice_per_device_hour = 3600\nbudget_money = 1.5\n"
                      + stage("long", "import time; time.sleep(60)"))
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    started = time.monotonic()
    result = subprocess.run([PY, "-m", "gonogo", "run", str(plan), "--out", str(out)], env=env,
                            capture_output=True, text=True, timeout=60,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert time.monotonic() - started < 30, "the kill did not stop the 60 s stage"
    assert result.returncode == 1, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"][0]["reason"].startswith("budget kill during stage 'long'")


def test_a_budget_with_room_is_go_and_measures_the_cost(write_plan, tmp_path):
    plan = write_plan("[plan]\nname = 'cheap'\nprice_per_device_hour = 2.5\nbudget_money = 100\n"
                      "budget_device_hours = 1\n" + stage("a", WRITE)
                      + "\n[assumptions]\ncost = '< 1'\n")
    out = tmp_path / "run"
    result = run_gonogo("run", plan, "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    budget = summary["budget"]
    assert budget["binding"] == "device-hours" and budget["limit_device_hours"] == 1
    assert budget["alarm"] is None and budget["kill"] is None
    assert 0 < budget["cost"] == summary["plan"]["device_hours_used"] * 2.5
    register = {row["key"]: row["status"] for row in summary["assumptions"]}
    assert register == {"cost": "validated", "budget_alarm": "validated", "budget_kill": "validated"}


def test_a_money_budget_without_a_price_is_one_line_exit_2(write_plan, tmp_path):
    plan = write_plan("[plan]\nbudget_money = 10\n" + stage("a", WRITE))
    result = run_gonogo("run", plan, "--out", tmp_path / "run")
    assert result.returncode == 2
    assert "budget_money needs a price_per_device_hour" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_capacity_takes_the_plans_price(write_plan, tmp_path):
    plan = write_plan("[plan]\nprice_per_device_hour = 7\n" + stage("a", WRITE))
    result = run_gonogo("capacity", "--model", "llama3-8b", "--gpu", "h100", "--gpus", "8", "--plan", plan,
                        "--json", "-", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    estimate = json.loads(result.stdout)
    assert estimate["price_per_gpu_hour"] == 7 and estimate["cost_usd"] == estimate["gpu_hours"] * 7
    assert 'price_per_gpu_hour = 7' in (tmp_path / "run" / "plan.toml").read_text()  # the price it ran with
    unpriced = write_plan(stage("a", WRITE), name="unpriced.toml")
    result = run_gonogo("capacity", "--model", "llama3-8b", "--gpu", "h100", "--gpus", "8", "--plan", unpriced,
                        "--out", tmp_path / "unpriced-run")
    assert result.returncode == 2 and "sets no price_per_device_hour" in result.stderr
    assert not (tmp_path / "unpriced-run").exists()


def test_a_capacity_stage_prices_with_its_plans_price(write_plan, tmp_path):
    plan = write_plan('[plan]\nprice_per_device_hour = 7\n\n[[stage]]\nname = "cap"\nkind = "capacity"\n'
                      'model = "llama3-8b"\ngpu = "h100"\ngpus = 8\ngates = ["fits == true"]\n')
    result = run_gonogo("run", plan, "--out", tmp_path / "run")
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((tmp_path / "run" / "stages" / "cap" / "metrics.json").read_text())
    assert metrics["cost_usd"] == pytest.approx(metrics["gpu_hours"] * 7)
