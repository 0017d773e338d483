"""The ``capacity`` stage in a plan, and the prediction of this machine's measured run."""

from __future__ import annotations

import json

import pytest

from gonogo.capacity.calibrate import read_measured
from gonogo.capacity.planner import estimate
from gonogo.stages.capacity.stage import CapacityStageSettings
from gonogo.stages.capacity.stage import run as run_stage
from gonogo.errors import UserError
from gonogo.rundir import RunDir, write_json_atomic
from gonogo.stages.base import StageContext
from gonogo.train.config import TrainConfig
from tests.conftest import run_gonogo

PLAN = """
[plan]
name = "capacity"

[[stage]]
name = "frontier"
kind = "capacity"
model = "llama3-405b"
gpu = "h100"
gpus = 16384
tp = 8
pp = 16
global_batch = 2048
sharding = "zero1"
activation_checkpointing = "full"
gates = ["fits == true", "time_to_train_days <= 365"]

[[stage]]
name = "eight-gpus"
kind = "capacity"
model = "llama3-405b"
gpu = "h100"
gpus = 8
sharding = "none"
gates = ["fits == true"]
continue_on_fail = true
"""


def test_plan_gates_show_fits(write_plan, tmp_path):
    out = tmp_path / "run"
    result = run_gonogo("run", write_plan(PLAN), "--out", out, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr   # NO-GO: 405B does not fit on 8 GPUs
    summary = json.loads((out / "summary.json").read_text())
    gates = {(gate["stage"], gate["expression"]): gate for gate in summary["gates"]}
    assert gates[("frontier", "fits == true")]["measured"] is True
    assert gates[("frontier", "fits == true")]["passed"] is True
    assert gates[("eight-gpus", "fits == true")]["measured"] is False
    assert gates[("eight-gpus", "fits == true")]["passed"] is False
    frontier = json.loads((out / "stages" / "frontier" / "metrics.json").read_text())
    assert {"memory_per_gpu_GB", "step_time_s", "time_to_train_days", "gpu_hours", "cost_usd"} <= set(frontier)
    assert "prediction_error_this_machine" not in frontier
    assert "no train stage" in frontier["calibration_note"]
    document = json.loads((out / "stages" / "frontier" / "capacity.json").read_text())
    assert document["calibration"] == {"produced": False, "reason": document["calibration"]["reason"]}
    assert "Memory per GPU by term" in (out / "report.html").read_text()


def test_impossible_layout_fails_before_anything_runs(write_plan, tmp_path):
    plan = write_plan(PLAN.replace("tp = 8", "tp = 3"))
    result = run_gonogo("run", plan, "--out", tmp_path / "run", timeout=120)
    assert result.returncode == 2
    assert "tp=3 does not divide" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "stages" / "frontier" / "metrics.json").exists()


def fake_measured_run(root, *, tokens_per_second=20000.0, mfu=0.1, world_size=2, busbw=1.4, memory_GB=16.0):
    """A run directory as doctor, collectives and a 2-process train stage leave it."""
    run_dir = RunDir.create(root, "laptop")
    run_dir.plan_path.write_text(
        '[plan]\nname = "laptop"\n'
        '[[stage]]\nname = "doctor"\nkind = "doctor"\n'
        '[[stage]]\nname = "net"\nkind = "collectives"\n'
        '[[stage]]\nname = "pretrain"\nkind = "train"\n'
        '[[stage]]\nname = "plan-ahead"\nkind = "capacity"\n', encoding="utf-8")
    for name, metrics in (("doctor", {"memory_GB": memory_GB}), ("net", {"busbw_GBps_avg": busbw}),
                          ("pretrain", {"tokens_per_second": tokens_per_second, "mfu": mfu,
                                        "world_size": world_size, "peak_memory_bytes": 900_000_000})):
        write_json_atomic(run_dir.stage_dir(name) / "metrics.json", metrics)
    config = TrainConfig().model_dump(mode="json")
    write_json_atomic(run_dir.stage_dir("pretrain") / "job.json", {"config": config})
    return run_dir


def context(run_dir: RunDir) -> StageContext:
    return StageContext(name="plan-ahead", kind="capacity", run_dir=run_dir, stage_dir=run_dir.stage_dir("plan-ahead"))


def test_this_machine_prediction_against_measurement(tmp_path):
    run_dir = fake_measured_run(tmp_path / "run")
    settings = CapacityStageSettings(model="llama3-8b", gpu="h100", gpus=8)
    metrics = run_stage(context(run_dir), settings)
    document = json.loads((run_dir.stage_dir("plan-ahead") / "capacity.json").read_text())
    calibration = document["calibration"]
    assert calibration["produced"] and calibration["train_stage"] == "pretrain"
    predicted, measured = calibration["predicted_tokens_per_second"], 20000.0
    assert metrics["prediction_error_this_machine"] == pytest.approx(abs(predicted - measured) / measured)
    # the default assumed MFU (0.5) is 5x the measured 0.1, so the prediction is far too fast
    assert predicted > 3 * measured
    # at the calibrated MFU the planner reproduces the measured throughput
    measured_run, _ = read_measured(run_dir)
    from gonogo.capacity.calibrate import settings_for

    again = estimate(settings_for(measured_run, metrics["calibrated_mfu_this_machine"]),
                     model=measured_run.model, gpu=measured_run.machine())
    assert again["tokens_per_second"] == pytest.approx(measured, rel=1e-4)
    # communication at the measured 1.4 GB/s is modelled, so calibration lands above the measured MFU
    assert metrics["calibrated_mfu_this_machine"] >= 0.1


def test_assumed_mfu_for_this_machine_changes_the_error(tmp_path):
    run_dir = fake_measured_run(tmp_path / "run")
    close = run_stage(context(run_dir), CapacityStageSettings(model="llama3-8b", gpu="h100", gpus=8,
                                                              this_machine_mfu=0.1))
    assert close["prediction_error_this_machine"] < 0.2


def test_this_machine_as_the_gpu_kind(tmp_path):
    run_dir = fake_measured_run(tmp_path / "run", memory_GB=16.0)
    settings = CapacityStageSettings(model="tiny-dense", gpu="this-machine", gpus=2)
    metrics = run_stage(context(run_dir), settings)
    document = json.loads((run_dir.stage_dir("plan-ahead") / "capacity.json").read_text())
    assert document["estimate"]["hbm_GB"] == 8.0          # 16 GB shared by two processes
    assert metrics["fits"] is True


def test_missing_measurements_are_said(tmp_path):
    run_dir = fake_measured_run(tmp_path / "run")
    (run_dir.stage_dir("net") / "metrics.json").unlink()
    metrics = run_stage(context(run_dir), CapacityStageSettings(model="llama3-8b", gpu="h100", gpus=8))
    assert "prediction_error_this_machine" not in metrics
    assert "busbw_GBps_avg" in metrics["calibration_note"]
    with pytest.raises(UserError, match="needs this machine's measurements"):
        run_stage(context(run_dir), CapacityStageSettings(model="tiny-dense", gpu="this-machine", gpus=2))
