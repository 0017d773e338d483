"""End to end: real `gonogo serve` processes, the router, a steady load, the controller.

The drills are the acceptance tests: a good canary is promoted; canaries with added latency,
with 5xx answers, and with degraded weights (only the quality check sees it) are rolled back;
the router causes no client-visible error in any of them. Killing the canary server in the
middle of the analysis ends in a rollback, not a hang.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

QUALITY_PROMPTS = 4  # the quality_checkpoint fixture memorised this many held-out problems


@pytest.mark.timeout(240)
def test_drill_promotes_the_good_canary_and_rolls_back_the_bad_ones(quality_checkpoint, tmp_path):
    from gonogo.stages.canary.stage import report, run_canary_drill

    result = run_canary_drill(tmp_path, quality_checkpoint, steps=(50, 100), interval_s=1.5, threshold=2,
                              quality_prompts=QUALITY_PROMPTS, injected_latency_s=1.5, error_rate=0.5)
    drills = result["drills"]
    assert set(drills) == {"latency", "errors", "degraded", "good"}
    assert drills["good"]["promoted"] and not drills["good"]["rolled_back"], drills["good"]
    for bad in ("latency", "errors", "degraded"):
        assert drills[bad]["rolled_back"] and not drills[bad]["promoted"], (bad, drills[bad])
    for name, metrics in drills.items():
        assert metrics["client_errors_router"] == 0, (name, metrics)
        assert metrics["client_requests"] > 0, (name, metrics)
        assert metrics["drained"], (name, metrics)
    # only the injected 5xx reach clients; the others lose nothing
    assert drills["errors"]["client_errors_canary"] > 0
    for name in ("latency", "degraded", "good"):
        assert drills[name]["client_errors"] == 0, (name, drills[name])
    assert result["passed"]
    assert json.loads((tmp_path / "drill.json").read_text())["passed"]

    # the degraded model is fast and error-free: the quality check alone rolled it back
    degraded = json.loads((tmp_path / "degraded" / "timeline.json").read_text())
    failing = {c["name"] for i in degraded["intervals"] for c in i["checks"] if not c["passed"]}
    assert failing == {"accuracy_drop"}, failing
    assert degraded["stable_accuracy"] == 1.0

    good = json.loads((tmp_path / "good" / "timeline.json").read_text())
    assert [w["weight"] for w in good["weights"]] == [50, 100]
    assert all(i["passed"] for i in good["intervals"])
    items = report(tmp_path / "good", drills["good"])
    assert any(item.png for item in items) and any(item.table for item in items)


@pytest.mark.timeout(180)
def test_killing_the_canary_mid_analysis_rolls_back(quality_checkpoint, tmp_path, capsys):
    from gonogo.cli import main

    out = tmp_path / "out"
    stage_dir = out / "stages" / "canary"
    ready = stage_dir / "canary-server.ready.json"
    killed = {}

    def kill_canary_once_serving() -> None:
        deadline = time.monotonic() + 120
        while not ready.is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.5)  # the rollout is past its first step by now
        os.kill(json.loads(ready.read_text())["pid"], signal.SIGKILL)
        killed["at"] = time.monotonic()

    killer = threading.Thread(target=kill_canary_once_serving, daemon=True)
    killer.start()
    code = main(["canary", "--stable", str(quality_checkpoint), "--canary", str(quality_checkpoint),
                 "--out", str(out), "--steps", "25,50,75,100", "--interval", "1.5", "--threshold", "2",
                 "--min-success-rate", "0.95", "--quality-prompts", "0", "--load-rate", "4",
                 "--load-concurrency", "3"])
    killer.join(timeout=5)
    assert "at" in killed
    metrics = json.loads((stage_dir / "metrics.json").read_text())
    assert code == 1, capsys.readouterr()   # rolled back = NO-GO
    assert metrics["rolled_back"] and not metrics["promoted"], metrics
    assert metrics["client_errors_router"] == 0 and metrics["client_errors_stable"] == 0, metrics
    # decided within a few intervals of the kill, not after a hang
    assert time.monotonic() - killed["at"] < 30, metrics
    timeline = json.loads((stage_dir / "timeline.json").read_text())
    assert timeline["weights"][-1]["weight"] == 0
    assert "ROLLED BACK" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "NO-GO" and "gate 'promoted == true'" in summary["reasons"][0]
    assert (stage_dir / "canary-server.log").is_file() and (stage_dir / "stable-server.json").is_file()


# -- `gonogo canary` through the plan runner, over stand-in servers attached by URL (fast) ---------------

FAST = ["--steps", "50,100", "--interval", "1", "--threshold", "2", "--quality-prompts", "0", "--load-rate", "10"]


@pytest.mark.timeout(120)
def test_canary_command_is_the_stage_through_the_runner(tmp_path, capsys):
    import tomllib

    from gonogo.cli import main
    from tests.stub_openai import stub_server

    with stub_server("ok") as stable, stub_server("ok") as canary:
        code = main(["canary", "--stable", stable, "--canary", canary, "--out", str(tmp_path / "go"), *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err          # promoted = GO
    run = tmp_path / "go"
    for name in ("plan.toml", "state.json", "summary.json", "report.html", "events.jsonl"):
        assert (run / name).is_file(), name
    stage = tomllib.loads((run / "plan.toml").read_text())["stage"][0]
    assert stage["kind"] == "canary" and stage["gates"] == ["promoted == true"]
    assert stage["stable"] == stable and stage["analysis"]["steps"] == [50, 100]
    metrics = json.loads((run / "stages" / "canary" / "metrics.json").read_text())
    assert metrics["promoted"] and metrics["client_errors"] == 0 and metrics["client_requests"] > 0, metrics
    assert json.loads((run / "state.json").read_text())["stages"]["canary"]["status"] == "passed"
    assert json.loads((run / "summary.json").read_text())["verdict"] == "GO"
    timeline = json.loads((run / "stages" / "canary" / "timeline.json").read_text())
    assert [w["weight"] for w in timeline["weights"]] == [50, 100]
    assert "canary: PROMOTED" in captured.out and "GO" in captured.err  # the decision on stdout, the runner's view on stderr
    assert "Canary weight over time" in (run / "report.html").read_text()


@pytest.mark.timeout(120)
def test_canary_command_rolls_back_a_failing_canary_as_no_go(tmp_path, capsys):
    from gonogo.cli import main
    from tests.stub_openai import stub_server

    with stub_server("ok") as stable, stub_server("fail") as canary:
        code = main(["canary", "--stable", stable, "--canary", canary, "--out", str(tmp_path / "run"), *FAST])
    assert code == 1                         # rolled back = NO-GO
    metrics = json.loads((tmp_path / "run" / "stages" / "canary" / "metrics.json").read_text())
    assert metrics["rolled_back"] and metrics["client_errors_canary"] > 0 and metrics["client_errors_router"] == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["verdict"] == "NO-GO"
    assert "canary: ROLLED BACK" in capsys.readouterr().out


def test_canary_command_refuses_missing_sides_and_paths_before_creating_anything(tmp_path, capsys, monkeypatch):
    from gonogo.cli import main

    monkeypatch.chdir(tmp_path)
    for argv, words in ((["--stable", "http://127.0.0.1:9"], "give both --stable and --canary"),
                        (["--stable", "http://127.0.0.1:9", "--canary", "no-such-checkpoint"], "no-such-checkpoint")):
        code = main(["canary", *argv, "--out", str(tmp_path / "run"), *FAST])
        error = capsys.readouterr().err.strip()
        assert code == 2 and len(error.splitlines()) == 1 and words in error, error
    assert list(tmp_path.iterdir()) == []  # no run directory, no runs/
