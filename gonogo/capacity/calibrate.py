"""This machine, measured: predict the run a plan just made here and compare.

The planner's inputs for this machine come from earlier stages of the same run directory:
the train stage (its model, batch and layout from ``stages/<train>/job.json``; its measured
``tokens_per_second`` and ``mfu``, from which the peak FLOP/s it was measured against follows),
the collectives stage (``busbw_GBps_avg``, the link rate) and the doctor stage (``memory_GB``).
The planner then predicts that training run with its *assumed* MFU, and the relative error of
the predicted tokens/s is ``prediction_error_this_machine``. The MFU that would have made the
prediction exact (communication and bubble modelled as usual) is reported too, as the
calibrated value to use for hardware like this.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Optional

from gonogo.capacity.hardware import GPUSpec, this_machine
from gonogo.capacity.planner import CapacitySettings, estimate
from gonogo.errors import UserError
from gonogo.model.shape import ModelConfig
from gonogo.model.flops import flops_per_token
from gonogo.rundir import RunDir
from gonogo.typed_config import load_toml

log = logging.getLogger(__name__)


def stages_of_kind(run_dir: RunDir, kind: str) -> list[str]:
    """Names of the plan's stages of ``kind`` that have written metrics, in plan order."""
    if not run_dir.plan_path.is_file():
        return []
    try:
        stages = load_toml(run_dir.plan_path).get("stage", [])
    except UserError:
        return []
    return [stage["name"] for stage in stages
            if stage.get("kind") == kind and (run_dir.stage_dir(stage["name"], create=False) / "metrics.json").is_file()]


def _first_metrics(run_dir: RunDir, kind: str, wanted: Optional[str]) -> tuple[Optional[str], dict[str, Any]]:
    names = [wanted] if wanted else stages_of_kind(run_dir, kind)
    for name in names:
        metrics = run_dir.stage_metrics(name)
        if metrics:
            return name, metrics
    return None, {}


@dataclass
class Measured:
    """What the run directory measured of this machine, and the train run to predict."""

    train_stage: str
    model: ModelConfig
    train: dict[str, Any]                 # the train job's [train] table (batch, seq, parallel, ...)
    world_size: int
    tokens_per_second: float
    mfu: float
    busbw_GBps: Optional[float]
    memory_GB: Optional[float]
    peak_memory_bytes: Optional[int]

    def peak_flops_per_process(self) -> float:
        # the trainer's MFU is tokens/s * flops_per_token / (its peak); solving for that peak keeps
        # the comparison consistent whatever device count the trainer divided by
        flops = flops_per_token(self.model, int(self.train["seq_len"]))
        return self.tokens_per_second * flops / self.mfu / self.world_size

    def machine(self) -> GPUSpec:
        memory = (self.memory_GB / self.world_size) if self.memory_GB else float("inf")
        # a single process needs no link; any positive rate makes the (zero) comm terms well defined
        busbw = self.busbw_GBps if self.busbw_GBps else 1.0
        return this_machine(peak_flops=self.peak_flops_per_process(), memory_GB=memory,
                            busbw_GBps=busbw, devices=self.world_size)


def read_measured(run_dir: RunDir, *, train_stage: Optional[str] = None,
                  collectives_stage: Optional[str] = None,
                  doctor_stage: Optional[str] = None) -> tuple[Optional[Measured], str]:
    """The measurements, or None and the reason they are not all there."""
    train_name, train = _first_metrics(run_dir, "train", train_stage)
    if not train_name:
        return None, "no train stage with metrics in this run (needs tokens_per_second and mfu)"
    if not train.get("tokens_per_second") or not train.get("mfu"):
        return None, f"train stage {train_name!r} has no measured tokens_per_second and mfu"
    job_path = run_dir.stage_dir(train_name, create=False) / "job.json"
    if not job_path.is_file():
        return None, f"train stage {train_name!r} left no job.json with its resolved config"
    job = json.loads(job_path.read_text(encoding="utf-8"))
    model = ModelConfig.model_validate(job["config"]["model"])
    world_size = int(train.get("world_size") or 1)
    collectives_name, collectives = _first_metrics(run_dir, "collectives", collectives_stage)
    busbw = collectives.get("busbw_GBps_avg")
    if world_size > 1 and not busbw:
        return None, ("no collectives stage with busbw_GBps_avg in this run; the planner needs the "
                      "measured link rate to predict a multi-process run")
    _, doctor = _first_metrics(run_dir, "doctor", doctor_stage)
    return Measured(train_stage=train_name, model=model, train=job["config"]["train"],
                    world_size=world_size, tokens_per_second=float(train["tokens_per_second"]),
                    mfu=float(train["mfu"]), busbw_GBps=float(busbw) if busbw else None,
                    memory_GB=doctor.get("memory_GB"),
                    peak_memory_bytes=train.get("peak_memory_bytes")), ""


def settings_for(measured: Measured, mfu: Optional[float]) -> CapacitySettings:
    """The planner's description of the measured train run."""
    train = measured.train
    sharding = "fsdp" if train.get("parallel", "fsdp") == "fsdp" else "none"
    return CapacitySettings(
        model=f"{measured.train_stage} (this run)", gpu="this-machine", gpus=measured.world_size,
        dp=measured.world_size, ep=int(train.get("expert_parallel", 1)),
        micro_batch=int(train["micro_batch_size"]), global_batch=int(train["global_batch_size"]),
        seq=int(train["seq_len"]), precision="bf16", activation_checkpointing="none",
        sharding=sharding, mfu=mfu, label="this machine: the measured train run")


def predict_this_machine(measured: Measured, mfu: Optional[float]) -> dict[str, Any]:
    """Prediction vs measurement; ``mfu`` is the assumed MFU (None: the planner's default)."""
    machine = measured.machine()
    settings = settings_for(measured, mfu)
    predicted = estimate(settings, model=measured.model, gpu=machine)
    error = abs(predicted["tokens_per_second"] - measured.tokens_per_second) / measured.tokens_per_second
    return {
        "train_stage": measured.train_stage,
        "predicted": predicted,
        "measured_tokens_per_second": measured.tokens_per_second,
        "predicted_tokens_per_second": predicted["tokens_per_second"],
        "measured_mfu": measured.mfu,
        "predicted_mfu": predicted["mfu"],
        "assumed_mfu": predicted["assumed_mfu"],
        "prediction_error": error,
        "calibrated_mfu": calibrated_mfu(measured),
        "predicted_memory_per_process_GB": predicted["memory_GB"]["total"],
        "measured_peak_memory_GB": (measured.peak_memory_bytes / 1e9) if measured.peak_memory_bytes else None,
        "peak_flops_per_process": machine.peak_tflops["bf16"] * 1e12,
        "busbw_GBps": measured.busbw_GBps,
    }


def calibrated_mfu(measured: Measured, iterations: int = 60) -> Optional[float]:
    """The assumed MFU at which the prediction equals the measurement (bisection), or None when
    even a compute term at 100% of peak would be slower than what was measured (the modelled
    communication alone is too slow: the link model is too pessimistic for this machine)."""
    machine = measured.machine()

    def predicted(mfu: float) -> float:
        return estimate(settings_for(measured, mfu), model=measured.model, gpu=machine)["tokens_per_second"]

    target = measured.tokens_per_second
    if predicted(1.0) < target:
        return None
    low, high = 1e-6, 1.0
    for _ in range(iterations):  # predicted tokens/s rises with the assumed MFU
        middle = (low + high) / 2
        if predicted(middle) < target:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def this_machine_spec(run_dir: RunDir, **stages: Optional[str]) -> GPUSpec:
    """The "this-machine" GPU kind for a capacity configuration, or a UserError saying what is missing."""
    measured, reason = read_measured(run_dir, **stages)
    if measured is None:
        raise UserError(f"gpu 'this-machine' needs this machine's measurements: {reason}")
    return measured.machine()

