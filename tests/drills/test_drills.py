"""Fault drills: a killed rank is restarted by torchrun, resumes from its last checkpoint and ends
with the fault-free twin's weights, bit for bit; drill reports read the run directory."""

from __future__ import annotations

import json

import pytest

from gonogo.cli import main
from gonogo.drills import fault_drills
from gonogo.stages.drill.stage import DrillSettings, _metrics
from gonogo.train.fault_injection import Fault


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_killed_rank_is_restarted_resumes_and_matches_the_twin_bitwise(tmp_path):
    metrics = fault_drills.run_drills(["kill"], tmp_path, steps=12, checkpoint_every=4, seed=3)
    outcome = json.loads((tmp_path / "drills.json").read_text())["outcomes"]["kill"][0]
    assert outcome["injected"] and outcome["completed"], outcome
    assert outcome["recovered"] and outcome["detected"] and outcome["detect_seconds"] > 0
    assert outcome["resumed_from"].endswith("step-00000004") or outcome["resumed_from"].endswith("step-00000008")
    assert outcome["steps_lost"] == outcome["fault_step"] % 4
    assert outcome["resumed_bitwise_equal"] is True
    assert metrics["recovered"] and metrics["resumed_bitwise_equal"] and metrics["kill_recovered"]
    result = json.loads((tmp_path / "kill-1" / "stages" / "train" / "result.json").read_text())
    assert result["restarts"] == 1 and result["steps_completed"] == 12


def _write_events(run_dir, records):
    run_dir.mkdir(parents=True)
    (run_dir / "events.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_corrupt_checkpoint_analysis_names_the_skipped_checkpoint(tmp_path):
    run_dir, twin_dir = tmp_path / "corrupt-1", tmp_path / "twin"
    _write_events(run_dir, [
        {"time": 10.0, "event": "attempt_started", "restart": 0, "step": 0},
        {"time": 12.0, "event": "fault_injected", "step": 8, "rank": 0},
        {"time": 15.5, "event": "attempt_started", "restart": 1, "step": 4,
         "resumed_from": "/r/checkpoints/train/step-00000004",
         "skipped_checkpoints": [["/r/checkpoints/train/step-00000008", "dcp/__0_0.distcp: sha256 does not match"]]},
    ])
    twin_dir.mkdir()
    run = {"run_dir": run_dir, "metrics": {"steps_completed": 12, "rollbacks": 0}, "error": None, "seconds": 30.0}
    outcome = fault_drills.analyse("corrupt-checkpoint", Fault("corrupt-checkpoint", 0, 8), run, {"run_dir": twin_dir}, 12)
    assert outcome["detected"] and outcome["recovered"]
    assert outcome["detect_seconds"] == pytest.approx(3.5)
    assert outcome["steps_lost"] == 4
    assert outcome["resumed_bitwise_equal"] is None  # no final checkpoints here to compare
    summary = fault_drills.summarize("corrupt-checkpoint", [outcome])
    assert summary["recovered_count"] == 1 and not summary["resumed_bitwise_equal"]


def test_a_straggler_run_that_names_another_rank_is_not_detected(tmp_path):
    run_dir = tmp_path / "straggler-1"
    _write_events(run_dir, [{"time": 1.0, "event": "fault_injected", "step": 1, "rank": 1}])
    run = {"run_dir": run_dir, "metrics": {"straggler_ranks": [0, 1], "steps_completed": 12}, "error": None,
           "seconds": 9.0}
    outcome = fault_drills.analyse("straggler", Fault("straggler", 1, 1), run, {"run_dir": tmp_path}, 12)
    assert outcome["straggler_detected"] is False
    assert fault_drills.summarize("straggler", [outcome])["straggler_detected"] is False


def test_drill_settings_and_declared_metrics():
    settings = DrillSettings(kinds=["kill", "torn-checkpoint"])
    assert {"recovered", "detect_seconds", "steps_lost", "resumed_bitwise_equal", "straggler_detected",
            "torn_checkpoint_recovered"} <= _metrics(settings)
    with pytest.raises(ValueError, match="unknown drill kind"):
        DrillSettings(kinds=["meteor"])
    # one GPU, one process: a kill drill yes, a straggler drill (a rank named against others) no
    assert DrillSettings(kinds=["kill"], nproc=1).nproc == 1
    with pytest.raises(ValueError, match="straggler drill needs nproc >= 2"):
        DrillSettings(kinds=["kill", "straggler"], nproc=1)


def test_unknown_drill_kind_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["drill", "meteor", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "meteor" in error
    assert not (tmp_path / "out").exists()
