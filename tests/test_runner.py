"""The plan runner end to end through the real CLI: verdicts, exit codes, run directory, resume, interrupt."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO, run_gonogo

PY = sys.executable


def stage(name, code, metrics=("score",), gates=("score >= 1",), extra=""):
    return f'''
[[stage]]
name = "{name}"
kind = "command"
argv = ["{PY}", "-c", {json.dumps(code)}]
metrics = {json.dumps(list(metrics))}
gates = {json.dumps(list(gates))}
{extra}
'''


WRITE = "import json, os; json.dump({{'score': {score}}}, open(os.path.join(os.environ['GONOGO_STAGE_DIR'], 'metrics.out.json'), 'w'))"


def test_go_plan_writes_the_run_directory(write_plan, tmp_path):
    plan = write_plan("[plan]\nname = 'two'\n" + stage("a", WRITE.format(score=3)) + stage("b", WRITE.format(score=5))
                      + "\n[assumptions]\nscore = '>= 4'\n'a.score' = '>= 4'\n")
    out = tmp_path / "run"
    result = run_gonogo("run", plan, "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "GO" in result.stdout
    for name in ("plan.toml", "state.json", "events.jsonl", "summary.json", "report.html", "environment.json",
                 "stages/a/metrics.json", "stages/b/command.log"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "GO"
    assert [g["measured"] for g in summary["gates"]] == [3, 5]
    statuses = {a["key"]: (a["status"], a["measured"]) for a in summary["assumptions"]}
    assert statuses == {"score": ("validated", 5), "a.score": ("refuted", 3)}  # the last producer, or the named stage
    html = (out / "report.html").read_text()
    assert "GO" in html and "score &gt;= 1" in html


def test_impossible_gate_is_no_go_and_stops_the_plan(write_plan, tmp_path):
    plan = write_plan(stage("a", WRITE.format(score=3), gates=("score >= 1000",)) + stage("b", WRITE.format(score=5)))
    out = tmp_path / "run"
    result = run_gonogo("run", plan, "--out", out)
    assert result.returncode == 1, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "NO-GO"
    assert [s["status"] for s in summary["stages"]] == ["failed", "not run"]
    assert "score >= 1000" in summary["reasons"][0] and "measured 3" in summary["reasons"][0]


def test_continue_on_fail_runs_on_but_stays_no_go(write_plan, tmp_path):
    plan = write_plan(stage("a", WRITE.format(score=0), extra="continue_on_fail = true") + stage("b", WRITE.format(score=5)))
    result = run_gonogo("run", plan, "--out", tmp_path / "run")
    assert result.returncode == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["failed", "passed"]


def test_unmeasured_metric_fails_its_gate(write_plan, tmp_path):
    plan = write_plan(stage("a", "pass"))  # writes no metrics file
    result = run_gonogo("run", plan, "--out", tmp_path / "run")
    assert result.returncode == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["gates"][0]["status"] == "fail" and summary["gates"][0]["measured"] is None
    assert summary["gates"][0]["reason"] == "not measured"


def test_a_metric_the_stage_could_not_read_fails_with_its_reason(write_plan, tmp_path):
    unknown = ("import json, os; json.dump({'score': None, 'unknown': {'score': 'counter unreadable: EPERM'}}, "
               "open(os.path.join(os.environ['GONOGO_STAGE_DIR'], 'metrics.out.json'), 'w'))")
    plan = write_plan(stage("a", unknown) + "\n[assumptions]\nscore = '>= 0'\n")
    result = run_gonogo("run", plan, "--out", tmp_path / "run")
    assert result.returncode == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["verdict"] == "NO-GO"
    assert summary["gates"][0]["reason"] == "not measured: counter unreadable: EPERM"
    assert "not measured: counter unreadable: EPERM" in summary["reasons"][0]
    assert summary["assumptions"][0]["status"] == "untested"
    assert summary["assumptions"][0]["reason"] == "counter unreadable: EPERM"
    assert "counter unreadable: EPERM" in (tmp_path / "run" / "report.html").read_text()


def test_unknown_metric_exits_2_before_anything_runs(write_plan, tmp_path):
    marker = tmp_path / "ran"
    plan = write_plan(stage("a", f"open({str(marker)!r}, 'w')", gates=("scroe >= 1",)))
    out = tmp_path / "run"
    result = run_gonogo("run", plan, "--out", out)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown metric 'scroe'" in lines[0]
    assert not marker.exists() and not out.exists()


def test_existing_run_directory_is_never_overwritten(write_plan, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = run_gonogo("run", write_plan(stage("a", WRITE.format(score=3))), "--out", out)
    assert result.returncode == 2 and "never overwritten" in result.stderr
    assert (out / "precious.txt").read_text() == "keep me"


def test_resume_after_a_failed_stage_skips_what_passed(write_plan, tmp_path):
    counter = tmp_path / "a-runs"
    flag = tmp_path / "fixed"
    count_a = f"p={str(counter)!r}; open(p, 'a').write('x'); " + WRITE.format(score=3)
    flaky_b = f"import os, sys; sys.exit(0 if os.path.exists({str(flag)!r}) else 3)"
    plan = write_plan(stage("a", count_a) + stage("b", flaky_b, metrics=(), gates=("exit_code == 0",))
                      + stage("c", WRITE.format(score=2)))
    out = tmp_path / "run"
    first = run_gonogo("run", plan, "--out", out)
    assert first.returncode == 1
    state = json.loads((out / "state.json").read_text())
    assert [state["stages"][n]["status"] for n in "abc"] == ["passed", "failed", "not run"]
    flag.write_text("yes")
    second = run_gonogo("run", "--resume", "--out", out)
    assert second.returncode == 0, second.stdout + second.stderr
    assert counter.read_text() == "x"                      # stage a was not run again
    assert (out / "stages" / "b.attempt-1" / "command.log").exists()  # the failed attempt's files are kept
    assert json.loads((out / "summary.json").read_text())["plan"]["attempts"] == 2


def test_only_and_skip(write_plan, tmp_path):
    plan = write_plan(stage("a", WRITE.format(score=3)) + stage("b", WRITE.format(score=5)))
    result = run_gonogo("run", plan, "--out", tmp_path / "r1", "--only", "b")
    # a plan is proved as a whole: a run that skipped a stage is never GO
    assert result.returncode == 1, result.stdout + result.stderr
    assert "INCOMPLETE" in result.stdout and "GO  plan" not in result.stdout.replace("NO-GO", "")
    summary = json.loads((tmp_path / "r1" / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["skipped", "passed"]
    assert summary["verdict"] == "INCOMPLETE"
    assert summary["not_run"] == [{"stage": "a", "status": "skipped", "reason": "skipped (--only/--skip)"}]
    assert "1 of 2 stages not run: a" in summary["reasons"][0]
    html = (tmp_path / "r1" / "report.html").read_text()
    assert "INCOMPLETE" in html and "1 of 2 stages not run" in html
    # resuming runs what was skipped, and then the plan is GO
    resumed = run_gonogo("run", "--resume", "--out", tmp_path / "r1")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert json.loads((tmp_path / "r1" / "summary.json").read_text())["verdict"] == "GO"
    bad = run_gonogo("run", plan, "--out", tmp_path / "r2", "--skip", "zzz")
    assert bad.returncode == 2 and "no stage named 'zzz'" in bad.stderr


def test_budget_stops_the_plan(write_plan, tmp_path):
    slow = "import time; time.sleep(1.5); " + WRITE.format(score=3)
    plan = write_plan("[plan]\nbudget_device_hours = 0.0003\n" + stage("a", slow) + stage("b", WRITE.format(score=5)))
    result = run_gonogo("run", plan, "--out", tmp_path / "run")
    assert result.returncode == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stages"][1]["status"] == "not run" and "budget" in summary["stages"][1]["reason"]


def _wait_for(path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_interrupt_stops_children_and_resume_finishes(write_plan, tmp_path):
    for sig in (signal.SIGINT, signal.SIGTERM):
        pid_file = tmp_path / f"child-{sig}.pid"
        flag = tmp_path / f"second-time-{sig}"
        sleeper = (f"import os, time, json; open({str(pid_file)!r}, 'w').write(str(os.getpid()));\n"
                   f"time.sleep(0 if os.path.exists({str(flag)!r}) else 120);\n" + WRITE.format(score=4))
        plan = write_plan(stage("a", WRITE.format(score=3)) + stage("slow", sleeper) + stage("c", WRITE.format(score=2)),
                          name=f"plan-{sig}.toml")
        out = tmp_path / f"run-{sig}"
        env = dict(os.environ, PYTHONPATH=str(REPO))
        process = subprocess.Popen([sys.executable, "-m", "gonogo", "run", str(plan), "--out", str(out)],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for(pid_file, 60)
        child = int(pid_file.read_text())
        time.sleep(0.5)
        process.send_signal(sig)
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 130, stdout + stderr
        assert not _alive(child), "the stage's child process outlived the interrupt"
        state = json.loads((out / "state.json").read_text())
        assert state["stages"]["slow"]["status"] == "interrupted"
        assert json.loads((out / "summary.json").read_text())["verdict"] == "INTERRUPTED"
        flag.write_text("go")
        resumed = run_gonogo("run", "--resume", "--out", out)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr


def test_only_doctor_of_a_built_in_plan_is_not_go(tmp_path):
    out = tmp_path / "run"
    result = run_gonogo("run", "quick", "--only", "doctor", "--out", out, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    verdict_line = next(line for line in result.stdout.splitlines() if "plan 'quick'" in line)
    assert verdict_line.startswith("INCOMPLETE")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "INCOMPLETE"
    assert [s["stage"] for s in summary["not_run"]] == [s["name"] for s in summary["stages"][1:]]
