"""Restart on fewer ranks: a rank lost for good, the job resumes on N-1 ranks from the last
committed checkpoint (DCP reshards it) and continues the twin's loss curve."""

from __future__ import annotations

import json

import pytest

from gonogo.drills import fault_drills
from gonogo.stages.drill.stage import DrillSettings
from gonogo.train.fault_injection import Fault


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_shrink_2_to_1_resumes_resharded_and_continues_the_loss_curve(tmp_path):
    metrics = fault_drills.run_drills(["shrink"], tmp_path, steps=12, checkpoint_every=4, seed=1)
    outcome = json.loads((tmp_path / "drills.json").read_text())["outcomes"]["shrink"][0]
    assert outcome["first_part_failed"] and outcome["completed"], outcome
    assert outcome["ranks_before"] == 2 and outcome["ranks_after"] == 1
    assert outcome["resumed_from"].endswith("step-00000004") and outcome["steps_lost"] == outcome["fault_step"] - 4
    assert [point["step"] for point in outcome["loss_vs_twin"]] == [8, 12]
    assert outcome["loss_continuous"] and outcome["loss_max_relative_diff"] <= fault_drills.LOSS_CONTINUITY_TOLERANCE
    assert outcome["tokens_per_second_before"] > 0 and outcome["tokens_per_second_after"] > 0
    assert metrics["recovered"] and metrics["shrink_recovered"]


def _write(run_dir, records):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "events.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_shrink_with_a_loss_that_jumps_is_not_recovered(tmp_path):
    run_dir, twin_dir = tmp_path / "shrink-1", tmp_path / "twin"
    _write(run_dir, [
        {"time": 1.0, "event": "attempt_started", "restart": 0, "step": 0},
        {"time": 2.0, "rank": 0, "step": 4, "loss": 5.0, "tokens_per_second": 100.0},
        {"time": 3.0, "event": "attempt_started", "restart": 0, "step": 4,
         "resumed_from": "/r/checkpoints/train/step-00000004"},
        {"time": 4.0, "rank": 0, "step": 8, "loss": 4.0, "tokens_per_second": 60.0},
        {"time": 5.0, "rank": 0, "step": 12, "loss": 3.9, "tokens_per_second": 50.0},
    ])
    _write(twin_dir, [{"time": 1.0, "rank": 0, "step": 8, "loss": 4.0}, {"time": 2.0, "rank": 0, "step": 12, "loss": 3.5}])
    lost = {"run_dir": run_dir, "metrics": None, "error": "killed", "seconds": 5.0}
    resumed = {"run_dir": run_dir, "metrics": {"steps_completed": 12, "world_size": 1}, "error": None, "seconds": 5.0}
    outcome = fault_drills.analyse_shrink(Fault("kill", 1, 6), lost, resumed, {"run_dir": twin_dir}, 12, 2)
    assert outcome["steps_lost"] == 2 and outcome["resumed_step"] == 4
    assert outcome["tokens_per_second_before"] == 100.0 and outcome["tokens_per_second_after"] == 50.0
    assert outcome["loss_continuous"] is False and outcome["recovered"] is False
    twin_dir.joinpath("events.jsonl").write_text(
        "".join(json.dumps({"time": 1.0, "rank": 0, "step": s, "loss": v}) + "\n" for s, v in ((8, 4.0), (12, 3.9))))
    outcome = fault_drills.analyse_shrink(Fault("kill", 1, 6), lost, resumed, {"run_dir": twin_dir}, 12, 2)
    assert outcome["loss_continuous"] is True and outcome["recovered"] is True
    assert fault_drills.summarize("shrink", [outcome])["loss_continuous"] is True


def test_shrink_needs_two_processes():
    with pytest.raises(ValueError, match="shrink drill needs nproc >= 2"):
        DrillSettings(kinds=["shrink"], nproc=1)
