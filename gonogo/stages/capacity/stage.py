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

``gonogo capacity --model PRESET --gpu KIND --gpus N ... [--json F] [--out RUN_DIR]`` runs one such
stage with the default gate ``fits == true``: it prints the estimate (or writes it as JSON, ``-``
for stdout) and exits 1 when the layout does not fit in memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

from pydantic import Field

from gonogo.capacity.hardware import THIS_MACHINE, get_gpu, gpu_names
from gonogo.capacity.planner import CapacitySettings, estimate, gate_metrics, load_model, resolve_layout
from gonogo.errors import UserError
from gonogo.rundir import write_json_atomic
from gonogo.stages.base import Metrics, ReportItem, StageCommand, StageContext, StageKind, StageSettings

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
    if settings.gpu == THIS_MACHINE or _is_path(settings.model):
        return  # this machine is known only at run time; plan-relative paths resolve then too
    try:
        check_layout(settings)
    except UserError as error:
        raise UserError(f"capacity stage ({settings.model} on {settings.gpus} {settings.gpu}): {error}") from None


def check_layout(settings: CapacitySettings) -> None:
    """UserError (one line) for an unknown GPU, a precision it cannot run, or an impossible layout."""
    get_gpu(settings.gpu).peak_flops(settings.precision)
    resolve_layout(settings, load_model(settings.model))


def _is_path(model: str) -> bool:
    return model.endswith(".toml") or "/" in model


def declared_metrics(settings: CapacityStageSettings) -> set[str]:
    check(settings)
    return set(METRICS)


def run(ctx: StageContext, settings: CapacityStageSettings) -> Metrics:
    from gonogo.capacity.calibrate import predict_this_machine, read_measured, this_machine_spec

    stages = {"train_stage": settings.train_stage, "collectives_stage": settings.collectives_stage,
              "doctor_stage": settings.doctor_stage}
    model_name = settings.model
    if _is_path(model_name):
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


# -- gonogo capacity ---------------------------------------------------------------------------------

_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str) -> float:
    """A count such as ``15.6e12``, ``15.6T``, ``800B`` or ``2M``."""
    raw = text.strip().lower()
    scale = 1.0
    if raw and raw[-1] in _SUFFIXES:
        scale, raw = _SUFFIXES[raw[-1]], raw[:-1]
    try:
        return float(raw) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (examples: 15.6e12, 15.6T, 800B)") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model preset (llama3-8b, llama3-70b, llama3-405b, "
                        "deepseek-v3, gpt-oss-20b, ...) or a TOML file with a [model] table")
    parser.add_argument("--gpu", required=True, help=f"GPU kind: {', '.join(gpu_names())}")
    parser.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel degree (with sequence parallel)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel degree")
    parser.add_argument("--ep", type=int, default=1, help="expert parallel degree (MoE)")
    parser.add_argument("--cp", type=int, default=1, help="context parallel degree")
    parser.add_argument("--dp", type=int, default=None, help="data parallel degree (default: gpus/(tp*pp*cp))")
    parser.add_argument("--virtual-stages", type=int, default=1, help="interleaved pipeline chunks per GPU")
    parser.add_argument("--precision", choices=["bf16", "fp8", "nvfp4"], default="bf16",
                        help="matmul precision (optimizer states stay fp32)")
    parser.add_argument("--global-batch", type=int, default=None, help="sequences per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per forward per pipeline")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's max_seq_len)")
    parser.add_argument("--tokens", type=parse_count, default=None,
                        help="tokens to train on, e.g. 15.6T (default: 20 per active parameter)")
    parser.add_argument("--price-per-gpu-hour", "--price-per-device-hour", dest="price_per_gpu_hour", type=float,
                        default=None, help="USD per GPU-hour (default: --plan's price_per_device_hour, "
                        "else the table's assumed price)")
    parser.add_argument("--plan", default=None, metavar="PLAN",
                        help="take the price from this plan's [plan] price_per_device_hour (the price its "
                             "cost alarms use)")
    parser.add_argument("--mfu", type=float, default=None,
                        help="assumed MFU of the compute term (default: 0.50 bf16, 0.35 fp8, 0.25 nvfp4)")
    parser.add_argument("--activation-checkpointing", choices=["none", "full", "selective"], default="selective")
    parser.add_argument("--sharding", choices=["fsdp", "zero1", "none"], default="fsdp",
                        help="fsdp = ZeRO-3 (FSDP2); zero1 = sharded optimizer states; none = DDP")
    parser.add_argument("--overlap", choices=["dp", "none", "all"], default="dp",
                        help="what hides behind compute: dp = data-parallel and context-parallel "
                             "communication (default); none; all")
    parser.add_argument("--memory-reserve", type=float, default=0.10,
                        help="share of HBM kept free for the CUDA context, NCCL and fragmentation")
    parser.add_argument("--json", metavar="F", default=None, help="write the full estimate as JSON to F ('-' = stdout)")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: a new folder under runs/)")


def plan_price(plan_arg: str) -> float:
    """A plan's price_per_device_hour, for ``--plan``: one price for the estimate and the cost alarms."""
    from gonogo.plan import load_plan, resolve_plan_path

    plan = load_plan(resolve_plan_path(plan_arg))
    if plan.header.price_per_device_hour is None:
        raise UserError(f"--plan {plan_arg}: plan {plan.name!r} sets no price_per_device_hour in its [plan] table; "
                        f"add one, or give --price-per-gpu-hour")
    return plan.header.price_per_device_hour


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    price = args.price_per_gpu_hour
    if args.plan and price is None:
        price = plan_price(args.plan)
    return {
        "model": args.model, "gpu": args.gpu, "gpus": args.gpus, "tp": args.tp, "pp": args.pp,
        "ep": args.ep, "cp": args.cp, "dp": args.dp, "virtual_stages": args.virtual_stages,
        "precision": args.precision, "global_batch": args.global_batch, "micro_batch": args.micro_batch,
        "seq": args.seq, "tokens": args.tokens, "price_per_gpu_hour": price,
        "mfu": args.mfu, "activation_checkpointing": args.activation_checkpointing,
        "sharding": args.sharding, "overlap": args.overlap, "memory_reserve": args.memory_reserve,
    }


def _check(args: argparse.Namespace, settings: CapacityStageSettings) -> None:
    """Everything the estimate can refuse, and the outputs, before the run directory exists."""
    from gonogo.files import check_output_file

    if settings.gpu == THIS_MACHINE:
        raise UserError("--gpu this-machine works inside a plan (after doctor, collectives and train "
                        "stages); on the command line name a GPU kind: " + ", ".join(gpu_names()))
    if args.json and args.json != "-":
        check_output_file(args.json, "--json")
    check_layout(settings)


def _summary(args: argparse.Namespace, stage_dir: Path, metrics: Metrics) -> None:
    result = json.loads((stage_dir / "capacity.json").read_text(encoding="utf-8"))["estimate"]
    if args.json == "-":
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    if args.json:
        write_json_atomic(Path(args.json), result)
    print_estimate(result)


def print_estimate(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summary = Table(title=f"capacity: {result['label']}", show_header=False)
    summary.add_column("item", style="bold")
    summary.add_column("value")
    for row in summary_rows(result):
        value = row["value"]
        if row["item"].startswith("memory per GPU"):
            value = f"[{'green' if result['fits'] else 'red'}]{value}[/]"
        summary.add_row(row["item"], value)
    console.print(summary)

    terms = Table(title="by term")
    terms.add_column("memory per GPU", style="bold")
    terms.add_column("GB", justify="right")
    terms.add_column("step time", style="bold")
    terms.add_column("seconds", justify="right")
    terms.add_column("link")
    memory = [(k, v) for k, v in result["memory_GB"].items() if k != "total"] + [("total", result["memory_GB"]["total"])]
    step = [(k, v) for k, v in result["step_time_s"].items() if k != "total"] + [("total", result["step_time_s"]["total"])]
    for index in range(max(len(memory), len(step))):
        mem_name, mem_value = memory[index] if index < len(memory) else ("", None)
        step_name, step_value = step[index] if index < len(step) else ("", None)
        terms.add_row(mem_name, "" if mem_value is None else f"{mem_value:,.2f}",
                      step_name, "" if step_value is None else f"{step_value:,.4f}",
                      result["links"].get(step_name, ""))
    console.print(terms)


STAGE = StageKind(
    name="capacity",
    description="capacity planner: memory per GPU, step time, time-to-train, GPU-hours and cost at "
                "scale, checked against this machine's measured run",
    settings=CapacityStageSettings,
    metrics=declared_metrics,
    run=run,
    report=report,
    devices=lambda settings: 0,
    # the estimate's own verdict: a layout that does not fit in memory is NO-GO (exit 1)
    default_gates=lambda settings: ["fits == true"],
    command=StageCommand(add_arguments=add_arguments, settings=_settings, check=_check, summary=_summary),
)
