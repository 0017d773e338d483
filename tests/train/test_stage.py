"""The `train` stage inside a plan: validated up front, run with torchrun, gated, reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gonogo.stages import get_kind
from gonogo.stages.train.stage import TrainStageSettings
from tests.train.train_helpers import TINY

REPO = Path(__file__).resolve().parents[2]


def gonogo(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "gonogo", *args], capture_output=True, text=True, timeout=280,
                          env=env, cwd=REPO)


def plan(tmp_path: Path, gates: list[str], config: str = "tiny-dense") -> Path:
    overrides = TINY + ["train.steps=4", "train.log_every=2", "train.val_every=2"]
    path = tmp_path / "plan.toml"
    path.write_text(f'[plan]\nname = "pretrain-test"\n\n[[stage]]\nname = "pretrain"\nkind = "train"\n'
                    f'config = "{config}"\nnproc = 2\noverrides = {json.dumps(overrides)}\n'
                    f'gates = {json.dumps(gates)}\n', encoding="utf-8")
    return path


def test_declared_metrics_depend_on_the_model():
    kind = get_kind("train")
    dense = kind.metrics(TrainStageSettings(config="tiny-dense"))
    assert {"final_loss", "val_loss", "tokens_per_second", "mfu", "peak_memory_bytes", "utilization_pct",
            "time_to_target_s", "steps"} <= dense
    assert "moe_load_imbalance" not in dense
    assert "moe_load_imbalance" in kind.metrics(TrainStageSettings(config="tiny-moe"))
    assert kind.devices(TrainStageSettings(nproc=4)) == 4


def test_unknown_metric_in_a_gate_fails_before_anything_runs(tmp_path):
    completed = gonogo("run", str(plan(tmp_path, ["tokens_per_sec >= 1"])), "--out", str(tmp_path / "run"))
    assert completed.returncode == 2
    assert "tokens_per_sec" in completed.stderr


@pytest.mark.timeout(300)
def test_plan_with_a_train_stage_is_go_and_reported(tmp_path):
    out = tmp_path / "run"
    completed = gonogo("run", str(plan(tmp_path, ["val_loss < 10", "tokens_per_second > 0", "steps == 4"])),
                       "--out", str(out))
    assert completed.returncode == 0, completed.stdout + completed.stderr
    metrics = json.loads((out / "stages" / "pretrain" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["world_size"] == 2
    assert (out / "stages" / "pretrain" / "torchrun.log").is_file()
    assert (out / "mlperf.log").is_file()
    report = (out / "report.html").read_text()
    assert "Loss and validation loss" in report and "data:image/png;base64" in report
