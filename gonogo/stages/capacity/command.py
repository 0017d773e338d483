"""``gonogo capacity``: the planner on the command line (a rich table, or JSON with --json)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from gonogo.capacity.hardware import gpu_names
from gonogo.errors import UserError
from gonogo.typed_config import validate

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


def plan_price(plan_arg: str) -> float:
    """A plan's price_per_device_hour, for ``--plan``: one price for the estimate and the cost alarms."""
    from gonogo.plan import load_plan, resolve_plan_path

    plan = load_plan(resolve_plan_path(plan_arg))
    if plan.header.price_per_device_hour is None:
        raise UserError(f"--plan {plan_arg}: plan {plan.name!r} sets no price_per_device_hour in its [plan] table; "
                        f"add one, or give --price-per-gpu-hour")
    return plan.header.price_per_device_hour


def settings_from_args(args: argparse.Namespace):
    from gonogo.capacity.planner import CapacitySettings

    if getattr(args, "plan", None) and args.price_per_gpu_hour is None:
        args.price_per_gpu_hour = plan_price(args.plan)

    data: dict[str, Any] = {
        "model": args.model, "gpu": args.gpu, "gpus": args.gpus, "tp": args.tp, "pp": args.pp,
        "ep": args.ep, "cp": args.cp, "dp": args.dp, "virtual_stages": args.virtual_stages,
        "precision": args.precision, "global_batch": args.global_batch, "micro_batch": args.micro_batch,
        "seq": args.seq, "tokens": args.tokens, "price_per_gpu_hour": args.price_per_gpu_hour,
        "mfu": args.mfu, "activation_checkpointing": args.activation_checkpointing,
        "sharding": args.sharding, "overlap": args.overlap, "memory_reserve": args.memory_reserve,
    }
    return validate(CapacitySettings, data, "command line")


def command(args: argparse.Namespace) -> int:
    from gonogo.capacity.hardware import THIS_MACHINE
    from gonogo.capacity.planner import estimate

    if args.gpu == THIS_MACHINE:
        raise UserError("--gpu this-machine works inside a plan (after doctor, collectives and train "
                        "stages); on the command line name a GPU kind: " + ", ".join(gpu_names()))
    if args.json and args.json != "-":
        from gonogo.files import check_output_file

        check_output_file(args.json, "--json")
    result = estimate(settings_from_args(args))
    if args.json == "-":
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if args.json:
        from pathlib import Path

        from gonogo.rundir import write_json_atomic

        write_json_atomic(Path(args.json), result)
    print_estimate(result)
    return 0


def print_estimate(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from gonogo.stages.capacity.stage import summary_rows

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
