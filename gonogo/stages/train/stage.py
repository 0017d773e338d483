"""The ``train`` stage kind and the ``gonogo train`` command: both launch torchrun workers.

    gonogo train PRESET_OR_CONFIG --nproc N [--out DIR] [--resume auto|never|PATH]
                 [--deterministic] [key=value ...]

The parent validates the config (and the checks that depend on the number of processes) before
anything starts, writes the resolved job to ``stages/<name>/job.json``, runs
``python -m torch.distributed.run ... -m gonogo.train.worker job.json`` as a bounded child
process group, follows the workers' progress lines, and returns rank 0's ``result.json`` as the
stage metrics. No torch import happens here at module level (the CLI and plan checks stay fast).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

from pydantic import Field

from gonogo.errors import StageFailed, UserError
from gonogo.rundir import RunDir
from gonogo.stages.base import Metrics, ReportItem, StageCommand, StageContext, StageKind, StageSettings
from gonogo.train.config import TrainConfig, check_world, load_train_config, overrides_list

STAGE_METRICS = {"final_loss", "val_loss", "tokens_per_second", "tokens_per_second_per_rank", "mfu",
                 "peak_memory_bytes", "utilization_pct", "time_to_target_s", "reached_target", "steps",
                 "train_seconds", "world_size", "parameters", "resumed_from_step",
                 # resilience (gonogo.train.guards, docs/resilience.md)
                 "restarts", "hang_detections", "rollbacks", "skipped_batches", "budget_stopped",
                 "steps_completed", "straggler_ranks", "min_relative_score",
                 # checkpoint cost (train.checkpoint_async; docs/checkpoint.md)
                 "checkpoint_saves", "checkpoint_blocked_s_mean", "checkpoint_blocked_s_max"}
LOG_NAME = "torchrun.log"


class TrainStageSettings(StageSettings):
    config: str = "tiny-dense"                    # a preset word or a TOML path (relative to the plan)
    nproc: int = Field(default=2, ge=1)
    overrides: Union[dict[str, Any], list[str]] = Field(default_factory=dict)
    deterministic: bool = False
    timeout_s: float = Field(default=1800.0, gt=0)
    resume: str = "auto"                          # "auto" | "never" | a checkpoint path
    # a stop-and-resume check inside the run: rank 0 is killed after this step in the first
    # attempt; torchrun restarts the workers and they resume from the newest committed checkpoint
    stop_and_resume_at: Optional[int] = Field(default=None, ge=1)
    # torchrun's multi-node options (nnodes, rdzv_endpoint, node_rank, ...; see rendezvous_options)
    rendezvous: Optional[dict[str, Any]] = None


def _is_moe(settings: TrainStageSettings) -> bool:
    """Whether the configured model has experts (decides if moe_load_imbalance is produced)."""
    try:
        config, _ = load_train_config(settings.config, overrides_list(settings.overrides))
    except UserError:
        # e.g. a path relative to the plan (unknown here): declare it rather than refuse a gate;
        # a config that really is broken fails with its own message when the stage runs
        return True
    return config.model.moe is not None


def stage_metrics(settings: TrainStageSettings) -> set[str]:
    return (STAGE_METRICS | ({"moe_load_imbalance"} if _is_moe(settings) else set())
            | ({"stopped_and_resumed"} if settings.stop_and_resume_at is not None else set()))


# -- launching ----------------------------------------------------------------------------------

def launch(config: TrainConfig, config_filename: str, nproc: int, *, run_dir: RunDir, stage: str,
           stage_dir: Path, resume: str, timeout_s: float,
           run_command: Callable[..., int], on_update: Callable[[dict[str, Any]], None],
           rendezvous: Optional[dict[str, Any]] = None, budget_device_hours: Optional[float] = None,
           env: Optional[dict[str, str]] = None) -> Metrics:
    """Run the workers to the end and return rank 0's metrics (StageFailed when they fail).

    ``rendezvous`` holds torchrun_command's multi-node options (nnodes, rdzv_endpoint, ...); on a
    node whose agent did not host rank 0 the result is ``{"rank0_elsewhere": True}``.
    """
    from gonogo.cluster.torchrun import torchrun_command, torchrun_env
    from gonogo.train.telemetry import parse_progress
    from gonogo.train.job import write_job

    preflight(config, nproc, resume)
    stage_dir.mkdir(parents=True, exist_ok=True)
    job_path = stage_dir / "job.json"
    result_path = stage_dir / "result.json"
    result_path.unlink(missing_ok=True)
    write_job(job_path, config=config, config_filename=config_filename, run_dir=run_dir.root,
              stage=stage, stage_dir=stage_dir, resume=resume, budget_device_hours=budget_device_hours,
              budget_started=time.time())
    extra = dict(env or {})
    if "OMP_NUM_THREADS" not in os.environ:
        # torchrun would give each worker 1 thread; share this machine's cores between them instead
        extra["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // nproc))
    # a failed attempt (a dead or hung rank) is restarted by torchrun and resumes by itself
    rendezvous = {"max_restarts": config.train.max_restarts, **(rendezvous or {})}
    argv = torchrun_command("gonogo.train.worker", [str(job_path)], nproc, **rendezvous)

    def on_line(line: str) -> None:
        update = parse_progress(line)
        if update is not None:
            on_update(update)

    from gonogo.train import memory, triage

    extra = {**triage.worker_env(stage_dir), **extra}
    memory.clear_records(stage_dir)
    from gonogo.procs import before_timeout_stop

    detail = f"the stage ran past its timeout_s={timeout_s:g} s; every rank was asked for its stack before the stop"
    try:
        with before_timeout_stop(lambda: triage.ask_ranks(run_dir.root, stage, stage_dir, detail)):
            code = run_command(argv, timeout=timeout_s, log_name=LOG_NAME, env=torchrun_env(extra), on_line=on_line)
    finally:
        # a hang, a collective timeout or a crash in any attempt left records: complete the bundle
        triage.finish(run_dir.root, stage, stage_dir)
    if code == 0 and not result_path.is_file() and str(rendezvous.get("nnodes", "1")) != "1":
        return {"rank0_elsewhere": True}  # rank 0 ran on another node: it writes the metrics
    if code != 0 and _rendezvous_failed(stage_dir / LOG_NAME):
        raise StageFailed(f"{stage}: this node could not join the rendezvous at "
                          f"{rendezvous.get('rdzv_endpoint', 'localhost')} with {rendezvous.get('nnodes', 1)} "
                          f"node(s) (did every node start, with the same --rdzv-id, and is the endpoint "
                          f"reachable?); see {stage_dir / LOG_NAME}")
    oom = memory.oom_message(stage_dir, stage) if code != 0 else None
    if oom is not None:
        raise StageFailed(oom)
    if code != 0 or not result_path.is_file():
        raise StageFailed(f"{stage}: training workers exited with code {code}; "
                          f"{_failure_reason(stage_dir / LOG_NAME)} (log: {stage_dir / LOG_NAME})")
    return json.loads(result_path.read_text(encoding="utf-8"))


def preflight(config: TrainConfig, nproc: int, resume: str) -> None:
    """Every check that can fail on the user's input, before a run directory or worker exists."""
    check_world(config, nproc)
    check_data(config)
    if resume not in ("auto", "never") and not Path(resume).exists():
        raise UserError(f"resume {resume}: no such checkpoint or run directory (or use auto / never)")
    if resume not in ("auto", "never"):
        from gonogo.checkpoints import check_resume_path

        check_resume_path(resume)  # verified here, before DCP unpickles anything in a worker


def check_data(config: TrainConfig) -> None:
    """Open both splits of the data source here, so a bad path or an empty split is the user's
    one-line error (exit 2) before any worker starts."""
    for split in ("train", "val"):
        config.data.open_source(split)


def _failure_reason(path: Path) -> str:
    """The workers' exception line from the torchrun log (or its last lines when there is none)."""
    import re

    try:
        lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    exception = re.compile(r"^(\[rank\d+\]:\s*)?[\w.]*(Error|Exception|Failed|Timeout)\b.*")
    for line in lines:
        if exception.match(line) and "ChildFailedError" not in line:
            return line.strip()
    return " | ".join(line.strip() for line in lines[-3:])


def progress_text(update: dict[str, Any]) -> str:
    text = f"step {update['step']}/{update['steps']} loss {update['loss']:.3f}"
    if update.get("val_loss") is not None:
        text += f" val {update['val_loss']:.3f}"
    return text + f" {update['tokens_per_second']:,.0f} tok/s"


def run(ctx: StageContext, settings: TrainStageSettings) -> Metrics:
    preset = settings.config
    if preset.endswith(".toml") or "/" in preset:
        preset = str(ctx.resolve_path(preset))
    config, path = load_train_config(preset, overrides_list(settings.overrides), settings.deterministic)
    resume = settings.resume
    if resume not in ("auto", "never"):
        resume = str(ctx.resolve_path(resume))
    env = None
    if settings.stop_and_resume_at is not None:
        every = config.train.checkpoint_every
        if not every or every >= settings.stop_and_resume_at or settings.stop_and_resume_at >= config.train.steps:
            raise UserError(f"stage {ctx.name!r}: stop_and_resume_at={settings.stop_and_resume_at} needs "
                            f"train.checkpoint_every (now {every}) below it and train.steps (now "
                            f"{config.train.steps}) above it, so there is a checkpoint to resume from")
        if config.train.max_restarts < 1:
            raise UserError(f"stage {ctx.name!r}: stop_and_resume_at needs train.max_restarts >= 1")
        env = {"GONOGO_FAULT": json.dumps({"kind": "kill", "rank": 0, "step": settings.stop_and_resume_at})}
    metrics = launch(config, path.name, settings.nproc, run_dir=ctx.run_dir, stage=ctx.name,
                     stage_dir=ctx.stage_dir, resume=resume, timeout_s=settings.timeout_s,
                     run_command=ctx.run_command, on_update=lambda update: ctx.progress(progress_text(update)),
                     budget_device_hours=ctx.budget_left_hours, env=env, rendezvous=settings.rendezvous)
    if settings.stop_and_resume_at is not None:
        # stopped once, and the restarted attempt picked up a committed checkpoint instead of step 0
        metrics["stopped_and_resumed"] = bool(metrics.get("restarts", 0) >= 1 and metrics.get("resumed_from_step", 0) > 0)
    return metrics


# -- the report -----------------------------------------------------------------------------------

def _rank0_lines(stage_dir: Path) -> list[dict[str, Any]]:
    from gonogo.events import events_file, read_events

    return [dict(line) for line in read_events(events_file(stage_dir.parent.parent), stage=stage_dir.name, rank=0)
            if "loss" in line]


def _triage_items(stage_dir: Path) -> list[ReportItem]:
    """First in the stage's report: what hung in each attempt that left a triage bundle."""
    from gonogo.train.triage import bundles

    found = bundles(stage_dir.parent.parent, stage_dir.name)  # <run>/stages/<name>
    rows = [{"attempt": Path(bundle["folder"]).name, "what hung": bundle["what_hung"], "bundle": bundle["folder"]}
            for bundle in found]
    return [ReportItem(title="Triage: what hung", table=rows)] if rows else []


def report(stage_dir: Path, metrics: Metrics) -> Optional[list[ReportItem]]:
    rows = _rank0_lines(stage_dir)
    triage_items = _triage_items(stage_dir)
    if not rows:
        return triage_items or None
    from gonogo.plots import new_figure, to_png

    items = triage_items
    steps = [r["step"] for r in rows]
    figure, axes = new_figure(6, 3.2)
    axes.plot(steps, [r["loss"] for r in rows], label="train loss")
    validation = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if validation:
        axes.plot(*zip(*validation), "o-", label="val loss")
    if metrics.get("target_val_loss") is not None:
        axes.axhline(metrics["target_val_loss"], color="grey", linestyle=":", label="target")
    axes.set_xlabel("step")
    axes.set_ylabel("nats / token")
    axes.legend()
    items.append(ReportItem(title="Loss and validation loss", png=to_png(figure)))

    figure, axes = new_figure(6, 3.2)
    axes.plot(steps, [r["tokens_per_second"] for r in rows], color="tab:blue")
    axes.set_xlabel("step")
    axes.set_ylabel("tokens / s (all ranks)", color="tab:blue")
    if any(r.get("mfu") is not None for r in rows):
        right = axes.twinx()
        right.plot(steps, [100 * (r.get("mfu") or 0) for r in rows], color="tab:orange")
        right.set_ylabel("MFU %", color="tab:orange")
    items.append(ReportItem(title="Throughput and MFU", png=to_png(figure)))

    final_fractions = metrics.get("expert_fractions")
    if final_fractions:
        figure, axes = new_figure(6, 3.2)
        n_layers = len(final_fractions)
        width = 0.8 / n_layers
        for layer, fractions in enumerate(final_fractions):
            axes.bar([e + layer * width for e in range(len(fractions))], fractions, width=width,
                     label=f"MoE layer {layer}")
        axes.axhline(1 / len(final_fractions[0]), color="grey", linestyle=":", label="balanced")
        axes.set_xlabel("expert")
        axes.set_ylabel("share of routed tokens")
        axes.legend(fontsize="small")
        items.append(ReportItem(title="Expert load (last log window)", png=to_png(figure)))
    summary = {key: metrics.get(key) for key in ("steps", "world_size", "precision", "parallel",
                                                 "compiled", "expert_parallel", "parameters", "peak_flops", "peak_source",
                                                 "time_to_target_s")}
    items.append(ReportItem(title="Run", table=[{"item": k, "value": v} for k, v in summary.items()]))
    items += _resilience_items(metrics)
    return items


def _resilience_items(metrics: Metrics) -> list[ReportItem]:
    """Restarts, rollbacks, skipped checkpoints, budget stop, and the last straggler scores."""
    from gonogo.train.guards import STRAGGLER_THRESHOLD

    items = []
    facts = {key: metrics.get(key) for key in ("restarts", "hang_detections", "rollbacks", "skipped_batches",
                                                "budget_stopped", "resumed_from", "steps_completed")}
    for path, reason in metrics.get("skipped_checkpoints") or []:
        facts[f"skipped {Path(path).name}"] = reason
    items.append(ReportItem(title="Resilience", table=[{"item": k, "value": v} for k, v in facts.items()]))
    reports = metrics.get("straggler_reports") or []
    if reports:
        last = reports[-1]
        rows = []
        for rank in range(len(last["individual"])):
            row: dict[str, Any] = {"rank": rank}
            for section, scores in last["relative"].items():
                row[f"relative {section}"] = scores[rank]
            row["individual"] = last["individual"][rank]
            row["straggler"] = "yes" if rank in (metrics.get("straggler_ranks") or []) else ""
            rows.append(row)
        items.append(ReportItem(title=f"Straggler scores (last gathering; a score < {STRAGGLER_THRESHOLD} names "
                                      f"a straggler)", table=rows))
    return items


# -- the command ----------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gonogo.stage_cli import IntermixedParser

    parser.__class__ = IntermixedParser
    parser.add_argument("config", metavar="PRESET_OR_CONFIG",
                        help="a preset word (tiny-dense, tiny-moe, small-dense) or a TOML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.steps=50 model.n_layers=2")
    parser.add_argument("--nproc", type=int, default=1, help="processes (ranks) on this machine (default: 1)")
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory (default: a new folder under runs/); an existing run "
                             "directory is continued unless --resume never")
    parser.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                        help="continue from the newest committed checkpoint of the run (auto), start "
                             "fresh (never), or load a checkpoint / run directory (PATH)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic kernels, fixed seeds, fp32 (for bitwise comparisons)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before the run is stopped (default: 3600)")
    parser.add_argument("--find-max-batch", action="store_true",
                        help="do not train: find the largest micro-batch that fits in memory (GPU memory, or "
                             "train.memory_cap_GB on CPU) by doubling then bisection")
    add_multinode_arguments(parser)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    if args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: must be at least 1")
    rendezvous = rendezvous_options(args)
    data: dict[str, Any] = {"config": args.config, "nproc": args.nproc, "overrides": list(args.overrides),
                            "deterministic": args.deterministic, "timeout_s": args.timeout, "resume": args.resume}
    if rendezvous != {"nnodes": "1", "rdzv_conf": {"join_timeout": 600}}:
        data["rendezvous"] = rendezvous
    return data


def _check(args: argparse.Namespace, settings: TrainStageSettings) -> None:
    config, _ = load_train_config(settings.config, overrides_list(settings.overrides), settings.deterministic)
    preflight(config, settings.nproc, settings.resume)


def _continue_run(args: argparse.Namespace, settings: TrainStageSettings) -> Optional[RunDir]:
    out = args.out
    if out is not None and out.is_dir() and (out / "stages").is_dir() and settings.resume != "never":
        config, _ = load_train_config(settings.config, overrides_list(settings.overrides), settings.deterministic)
        return continue_run_dir(out, "train", config.train.steps)
    return None


def _instead(args: argparse.Namespace) -> Optional[int]:
    if not args.find_max_batch:
        return None
    if args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: must be at least 1")
    load_train_config(args.config, args.overrides, args.deterministic)  # a mistake: one line, nothing created
    return _find_max_batch(args)


def _summary(args: argparse.Namespace, stage_dir: Path, metrics: Metrics) -> None:
    from rich.console import Console
    from rich.table import Table

    if metrics.get("rank0_elsewhere"):
        Console(stderr=True).print(f"node {args.node_rank}: its ranks finished; rank 0's node writes the metrics")
        return
    table = Table(title=f"gonogo train {args.config}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(STAGE_METRICS | {"moe_load_imbalance"}):
        if key in metrics:
            table.add_row(key, _format(metrics[key]))
    Console().print(table)


STAGE = StageKind(
    name="train",
    description="distributed pretraining (FSDP2 / DDP, expert parallel for MoE) with torchrun: loss, "
                "val loss, tokens/s, MFU, memory, utilisation, MLPerf time-to-train",
    settings=TrainStageSettings,
    metrics=stage_metrics,
    run=run,
    report=report,
    devices=lambda settings: settings.nproc,
    command=StageCommand(
        add_arguments=add_arguments, settings=_settings, check=_check, continue_run=_continue_run,
        summary=_summary, instead=_instead,
        resume_hint=lambda run_dir: (f"run the same command with --out {run_dir.root} "
                                     f"to continue from the newest checkpoint")),
)


def continue_run_dir(out: Path, stage: str, steps: int) -> RunDir:
    """An existing run directory given to ``train`` / ``finetune`` again, checked before any work.

    An unfinished stage (interrupted, failed) is resumed from its newest checkpoint. A finished one
    is continued only when ``train.steps`` now asks for more steps than it completed; its results
    then move to ``stages/<stage>.attempt-N/`` (as the plan runner keeps an earlier attempt), so
    the new ones never replace them. Otherwise: UserError, nothing touched.
    """
    from gonogo.files import check_output_dir

    check_output_dir(out)
    run_dir = RunDir(out)
    run_dir.read_state()  # a damaged state.json: one line now, not after the training
    stage_dir = run_dir.stage_dir(stage, create=False)
    metrics_path = stage_dir / "metrics.json"
    if not metrics_path.is_file():
        return run_dir
    try:
        finished = json.loads(metrics_path.read_text(encoding="utf-8"))
        done = finished.get("steps_completed", finished.get("steps"))
    except (OSError, ValueError, AttributeError):
        done = None
    if not isinstance(done, int):
        raise UserError(f"{out}: its {stage} finished, but {metrics_path} does not say after how many steps; "
                        f"move that file away to continue the run, or choose another --out")
    if done >= steps:
        raise UserError(f"{out}: its {stage} already finished {done} steps (results in {metrics_path}); "
                        f"set train.steps above {done} to continue it, or choose another --out")
    attempt = 1
    while (stage_dir.parent / f"{stage}.attempt-{attempt}").exists():
        attempt += 1
    kept = stage_dir.parent / f"{stage}.attempt-{attempt}"
    stage_dir.rename(kept)
    if stage == "train" and run_dir.mlperf_log_path.is_file():  # rewritten if the continuation starts at step 0
        import shutil

        shutil.copy2(run_dir.mlperf_log_path, kept / run_dir.mlperf_log_path.name)
    return run_dir


def _find_max_batch(args: argparse.Namespace) -> int:
    """``train --find-max-batch``: the ``memory`` stage kind, through the runner like any stage."""
    from rich.console import Console
    from rich.table import Table

    from gonogo.typed_config import validate
    from gonogo.plan_cli import LiveView, print_outcome
    from gonogo.runner import run_stage_alone
    from gonogo.stages import get_kind
    import gonogo.stages.memory.stage as memory_stage

    kind = get_kind("memory")
    settings = validate(kind.settings, {"config": args.config, "nproc": args.nproc, "overrides": list(args.overrides),
                                        "timeout_s": args.timeout}, "gonogo train --find-max-batch")
    console = Console(stderr=True)
    with LiveView(console) as view:
        outcome = run_stage_alone(kind, settings, out=args.out, observer=view,
                                  gates=["max_micro_batch_size >= 1"])
    if outcome.verdict == "INTERRUPTED":
        raise KeyboardInterrupt
    result = outcome.run_dir.stage_metrics("memory").get("probe")
    if result:
        table = Table(title="memory probe")
        for column in ("micro_batch_size", "fits", "peak GB", "seconds"):
            table.add_column(column)
        for trial in result["trials"]:
            table.add_row(str(trial["micro_batch_size"]), str(trial["fits"]), str(trial["peak_GB"]),
                          str(trial["seconds"]))
        Console().print(table)
        console.print(memory_stage.result_line(result), markup=False)
    print_outcome(console, outcome)
    return outcome.exit_code


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}"
    return str(value)


# -- multi-node (torchrun's c10d rendezvous) -------------------------------------------------------

def add_multinode_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-node (one `gonogo train` per node; see docs/scaling.md)")
    group.add_argument("--nnodes", default="1", help="nodes, or MIN:MAX for an elastic job (default: 1)")
    group.add_argument("--node-rank", type=int, default=None, help="this node's rank (0 .. nnodes-1)")
    group.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                       help="the c10d rendezvous endpoint every node joins (required with --nnodes > 1)")
    group.add_argument("--rdzv-id", default=None, help="the job id every node of one job shares")
    group.add_argument("--max-restarts", type=int, default=None,
                       help="worker group restarts torchrun may do (default: the config's train.max_restarts, 2)")
    group.add_argument("--join-timeout", type=float, default=600.0,
                       help="seconds a node waits for the others to join before it fails (default: 600)")


def rendezvous_options(args: argparse.Namespace) -> dict[str, Any]:
    """torchrun_command's keyword arguments from the multi-node flags (one line per mistake)."""
    nnodes = str(args.nnodes)
    if not all(part.isdigit() and int(part) >= 1 for part in nnodes.split(":")) or nnodes.count(":") > 1:
        raise UserError(f"--nnodes {nnodes}: give a number of nodes (2) or an elastic range MIN:MAX (1:4)")
    if nnodes != "1" and not args.rdzv_endpoint:
        raise UserError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (the address every node can reach)")
    if (args.max_restarts is not None and args.max_restarts < 0) or args.join_timeout <= 0:
        raise UserError("--max-restarts must be >= 0 and --join-timeout > 0")
    conf: dict[str, Any] = {"join_timeout": int(args.join_timeout)}
    if nnodes != "1" and args.node_rank is not None:
        # node 0 serves the rendezvous store (the endpoint names it in every launch form); said
        # explicitly because torchrun's guess (does the endpoint match a local hostname?) fails on
        # multi-homed hosts and lets two agents on one machine race for the port
        conf["is_host"] = int(args.node_rank == 0)
    options: dict[str, Any] = {"nnodes": nnodes, "rdzv_conf": conf}
    if args.max_restarts is not None:  # else the config's train.max_restarts (see launch)
        options["max_restarts"] = args.max_restarts
    for key in ("rdzv_endpoint", "rdzv_id", "node_rank"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    return options


def _rendezvous_failed(log_path: Path) -> bool:
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "RendezvousTimeoutError" in text or "RendezvousConnectionError" in text
