"""The ``capacity`` stage kind: one planner configuration per stage, plus this machine's check.

    [[stage]]
    name = "capacity-405b"
    kind = "capacity"
    model = "llama3-405b"
    gpu = "h100"
    gpus = 16384
    tp = 8
    pp = 16
    gates = ["fits == true", "time_to_train_days <= 90"]

Settings are the flags of ``gonogo capacity`` (see ``CapacitySettings``), plus which earlier
stages measured this machine (found by kind when left out). ``gpu = "this-machine"`` plans for
the machine the run is on, from those measurements. Writes ``stages/<name>/capacity.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from pydantic import Field

from gonogo.capacity.hardware import THIS_MACHINE, get_gpu
from gonogo.capacity.planner import CapacitySettings, estimate, gate_metrics, load_model, resolve_layout
from gonogo.errors import UserError
from gonogo.rundir import write_json_atomic
from gonogo.stages.base import Metrics, ReportItem, StageContext, StageKind, StageSettings, own_command

log = logging.getLogger(__name__)

METRICS = {"memory_per_gpu_GB", "fits", "step_time_s", "tokens_per_second", "mfu", "time_to_train_days",
           "gpu_hours", "cost_usd", "prediction_error_this_machine", "calibrated_mfu_this_machine"}


class CapacityStageSettings(CapacitySettings, StageSettings):
    train_stage: Optional[str] = None            # default: the plan's first train stage with metrics
    collectives_stage: Optional[str] = None      # default: the first collectives stage
    doctor_stage: Optional[str] = None           # default: the first doctor stage
    # the MFU assumed when predicting this machine's measured run (default: the planner's)
    this_machine_mfu: Optional[float] = Field(default=None, gt=0, le=1)

    def capacity_settings(self) -> CapacitySettings:
        fields = set(CapacitySettings.model_fields)
        return CapacitySettings(**{key: value for key, value in self.model_dump().items() if key in fields})


def check(settings: CapacityStageSettings) -> None:
    """Impossible layouts fail when the plan is loaded, not after the stages before this one ran."""
    if settings.gpu == THIS_MACHINE or settings.model.endswith(".toml") or "/" in settings.model:
        return  # this machine is known only at run time; plan-relative paths resolve then too
    try:
        gpu = get_gpu(settings.gpu)
        gpu.peak_flops(settings.precision)
        resolve_layout(settings, load_model(settings.model))
    except UserError as error:
        raise UserError(f"capacity stage ({settings.model} on {settings.gpus} {settings.gpu}): {error}") from None


def declared_metrics(settings: CapacityStageSettings) -> set[str]:
    check(settings)
    return set(METRICS)


def run(ctx: StageContext, settings: CapacityStageSettings) -> Metrics:
    from gonogo.capacity.calibrate import predict_this_machine, read_measured, this_machine_spec

    stages = {"train_stage": settings.train_stage, "collectives_stage": settings.collectives_stage,
              "doctor_stage": settings.doctor_stage}
    model_name = settings.model
    if model_name.endswith(".toml") or "/" in model_name:
        model_name = str(ctx.resolve_path(model_name))
    gpu = this_machine_spec(ctx.run_dir, **stages) if settings.gpu == THIS_MACHINE else None
    capacity = settings.capacity_settings()
    if capacity.price_per_gpu_hour is None and ctx.price_per_device_hour is not None:
        # the plan's price_per_device_hour, the one its cost alarms use
        capacity = capacity.model_copy(update={"price_per_gpu_hour": ctx.price_per_device_hour})
    result = estimate(capacity, model=load_model(model_name), gpu=gpu)
    metrics: dict[str, Any] = gate_metrics(result)
    document: dict[str, Any] = {"estimate": result}

    measured, reason = read_measured(ctx.run_dir, **stages)
    calibration: Optional[dict[str, Any]] = None
    if measured is not None:
        try:
            calibration = predict_this_machine(measured, settings.this_machine_mfu)
        except UserError as error:  # a train layout the planner cannot describe
            reason = f"the planner cannot describe train stage {measured.train_stage!r}: {error}"
    if calibration is None:
        note = f"prediction_error_this_machine not produced: {reason}"
        log.info("%s", note)
        ctx.progress(note)
        document["calibration"] = {"produced": False, "reason": reason}
        metrics["calibration_note"] = note
    else:
        document["calibration"] = {"produced": True, **calibration}
        metrics["prediction_error_this_machine"] = calibration["prediction_error"]
        if calibration["calibrated_mfu"] is not None:
            metrics["calibrated_mfu_this_machine"] = calibration["calibrated_mfu"]
        metrics["predicted_tokens_per_second_this_machine"] = calibration["predicted_tokens_per_second"]
        metrics["measured_tokens_per_second_this_machine"] = calibration["measured_tokens_per_second"]
    metrics["dominant_memory"] = result["dominant_memory"]
    metrics["dominant_time"] = result["dominant_time"]
    write_json_atomic(ctx.stage_dir / "capacity.json", document)
    return metrics


def report(stage_dir: Path, metrics: Metrics) -> Optional[list[ReportItem]]:
    import json

    path = stage_dir / "capacity.json"
    if not path.is_file():
        return None
    document = json.loads(path.read_text(encoding="utf-8"))
    result = document["estimate"]
    items = [
        ReportItem(title=f"Estimate: {result['label']}", table=summary_rows(result)),
        ReportItem(title="Memory per GPU by term (GB)", table=[
            {"term": key, "GB": round(value, 3)} for key, value in result["memory_GB"].items()]),
        ReportItem(title="Step time by term (s)", table=[
            {"term": key, "seconds": round(value, 4)} for key, value in result["step_time_s"].items()]),
    ]
    calibration = document.get("calibration", {})
    if calibration.get("produced"):
        items.append(ReportItem(title="This machine: prediction vs measurement", table=[
            {"quantity": "tokens/s", "predicted": round(calibration["predicted_tokens_per_second"], 1),
             "measured": round(calibration["measured_tokens_per_second"], 1)},
            {"quantity": "MFU", "predicted": round(calibration["predicted_mfu"], 4),
             "measured": round(calibration["measured_mfu"], 4)},
            {"quantity": "memory per process (GB)", "predicted": round(calibration["predicted_memory_per_process_GB"], 3),
             "measured": calibration["measured_peak_memory_GB"]},
        ], text=(f"prediction error {calibration['prediction_error']:.1%} at an assumed MFU of "
                 f"{calibration['assumed_mfu']:.2f}; the MFU that reproduces the measurement is "
                 f"{_maybe(calibration['calibrated_mfu'])}. Measured memory is the process's peak "
                 f"(on CPU its RSS, which includes the Python and PyTorch runtime).")))
    else:
        items.append(ReportItem(title="This machine", text=f"No prediction for this machine: "
                                f"{calibration.get('reason', 'no measurements')}."))
    return items


def _maybe(value: Optional[float]) -> str:
    return "n/a (the modelled communication alone is slower than measured)" if value is None else f"{value:.3f}"


def summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    layout = result["layout"]
    rows = [
        ("GPUs", f"{result['gpus']} x {result['gpu']}"),
        ("layout", f"tp {layout['tp']} pp {layout['pp']} cp {layout['cp']} ep {layout['ep']} dp {layout['dp']}"
                   f" (virtual stages {layout['virtual_stages']}), {layout['sharding']}, "
                   f"recompute {layout['activation_checkpointing']}, overlap {layout['overlap']}"),
        ("batch", f"{layout['global_batch']} x {layout['seq']} tokens, micro-batch {layout['micro_batch']}, "
                  f"{layout['micro_batches']} micro-batches per step"),
        ("precision", result["precision"]),
        ("memory per GPU (GB)", f"{result['memory_GB']['total']:.1f} of {result['memory_limit_GB']:.1f} usable "
                                f"({result['hbm_GB']:g} HBM) -> {'fits' if result['fits'] else 'DOES NOT FIT'}"),
        ("activations by recomputation (GB)", ", ".join(
            f"{mode} {value:.1f}" for mode, value in result["activations_by_checkpointing_GB"].items())),
        ("step time (s)", f"{result['step_time_s']['total']:.3f}"),
        ("tokens/s", f"{result['tokens_per_second']:,.0f}"),
        ("MFU", f"{result['mfu']:.1%} (compute term assumed at {result['assumed_mfu']:.0%})"),
        ("tokens", f"{result['tokens']:.3g}"),
        ("time to train (days)", f"{result['time_to_train_days']:,.1f}"),
        ("GPU-hours", f"{result['gpu_hours']:,.0f}"),
        ("cost (USD)", "n/a (no price)" if result["cost_usd"] is None
         else f"{result['cost_usd']:,.0f} at {result['price_per_gpu_hour']:g} USD per GPU-hour"),
        ("dominant", f"memory: {result['dominant_memory']}; time: {result['dominant_time']}"),
    ]
    return [{"item": key, "value": value} for key, value in rows]


STAGE = StageKind(
    name="capacity",
    description="capacity planner: memory per GPU, step time, time-to-train, GPU-hours and cost at "
                "scale, checked against this machine's measured run",
    settings=CapacityStageSettings,
    metrics=declared_metrics,
    run=run,
    report=report,
    devices=lambda settings: 0,
    command=own_command("gonogo.stages.capacity.command"),
)
