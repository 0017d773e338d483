"""The ``drill`` stage kind and the ``gonogo drill`` command.

    gonogo drill KIND [CONFIG] [--out DIR] [--repeat N] [--seed S] [--nproc N] [--steps N]

KIND: kill, hang, straggler, nan, torn-checkpoint, corrupt-checkpoint, canary, or a comma list;
CONFIG: a train preset or TOML (default tiny-dense, shrunk to a 2-layer d=64 model for drills).
See gonogo.drills.fault_drills for what each drill does and reports.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

from pydantic import Field, field_validator, model_validator

from gonogo.stages.base import Metrics, ReportItem, StageContext, StageCommand, StageKind, StageSettings

KINDS = ("kill", "hang", "straggler", "nan", "torn-checkpoint", "corrupt-checkpoint", "shrink", "canary")
METRICS = {"recovered", "detect_seconds", "steps_lost", "resumed_bitwise_equal", "straggler_detected",
           "triage_named"}


class DrillSettings(StageSettings):
    kinds: list[str] = Field(default_factory=lambda: ["kill", "torn-checkpoint", "straggler"])
    config: str = "tiny-dense"                   # train preset word or TOML path (relative to the plan)
    nproc: int = Field(default=2, ge=1)          # 1 only for kinds without a second rank (one GPU)
    steps: int = Field(default=24, ge=6)
    checkpoint_every: int = Field(default=4, ge=1)
    repeat: int = Field(default=1, ge=1)
    seed: int = 0
    timeout_s: float = Field(default=300.0, gt=0)  # per training run
    # the model the canary drill serves: a trained checkpoint or run dir (default: this plan's run
    # directory when an earlier stage saved a checkpoint there, else the drill's tiny twin)
    checkpoint: Optional[str] = None

    @field_validator("kinds")
    @classmethod
    def _known(cls, kinds: list[str]) -> list[str]:
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise ValueError(f"unknown drill kind(s) {unknown}; choose from {', '.join(KINDS)}")
        return kinds

    @model_validator(mode="after")
    def _straggler_needs_two(self) -> "DrillSettings":
        if "straggler" in self.kinds and self.nproc < 2:
            raise ValueError("the straggler drill needs nproc >= 2: a slow rank is named against the others")
        if "shrink" in self.kinds and self.nproc < 2:
            raise ValueError("the shrink drill needs nproc >= 2: it continues on one rank fewer")
        return self


def _metrics(settings: DrillSettings) -> set[str]:
    return METRICS | {f"{kind.replace('-', '_')}_recovered" for kind in settings.kinds}


def run(ctx: StageContext, settings: DrillSettings) -> Metrics:
    from gonogo.drills.fault_drills import run_drills

    config = settings.config
    if config.endswith(".toml") or "/" in config:
        config = str(ctx.resolve_path(config))
    checkpoint = ctx.resolve_model(settings.checkpoint)  # a path, or "@stage" of this plan
    if checkpoint is not None:
        pass
    elif "canary" in settings.kinds and (ctx.run_dir.root / "checkpoints").is_dir():
        checkpoint = str(ctx.run_dir.root)  # the plan's newest trained model (e.g. pretrain's)
    return run_drills(settings.kinds, ctx.stage_dir / "drills", repeat=settings.repeat, progress=ctx.progress,
                      canary_checkpoint=checkpoint, config=config, nproc=settings.nproc, steps=settings.steps,
                      checkpoint_every=settings.checkpoint_every, seed=settings.seed, timeout_s=settings.timeout_s)


def report_table(metrics: Metrics) -> list[dict[str, Any]]:
    rows = []
    for kind, summary in (metrics.get("drills") or {}).items():
        rows.append({"drill": kind, "recovered": f"{summary['recovered_count']}/{summary['repeats']}",
                     "detected": f"{summary['detected_count']}/{summary['repeats']}",
                     "detect s (median)": summary.get("detect_seconds"), "steps lost (max)": summary.get("steps_lost"),
                     "weights = twin": (f"{summary['bitwise_equal_count']}/{summary['repeats']}"
                                        + ("" if summary.get("bitwise_expected") else " (not expected: batch skipped)")
                                        if "bitwise_equal_count" in summary else "-"),
                     "straggler named": (f"{summary['straggler_detected_count']}/{summary['repeats']}"
                                         if "straggler_detected_count" in summary else "-"),
                     "triage names rank+frame": (f"{summary['triage_named_count']}/{summary['repeats']}"
                                                 if "triage_named_count" in summary else "-")})
    return rows


def shrink_line(number: int, outcome: dict[str, Any]) -> str:
    return (f"shrink #{number}: rank {outcome['fault_rank']} lost for good at step {outcome['fault_step']}; resumed "
            f"on {outcome['ranks_after']} rank(s) from step {outcome['resumed_step']} (steps lost "
            f"{outcome['steps_lost']}); tokens/s {outcome['tokens_per_second_before']} on {outcome['ranks_before']} -> "
            f"{outcome['tokens_per_second_after']} on {outcome['ranks_after']}; loss after the resume vs the "
            f"{outcome['ranks_before']}-rank twin: max relative difference {outcome['loss_max_relative_diff']} "
            f"({'continuous' if outcome['loss_continuous'] else 'NOT continuous'})")


def _shrink_rows(stage_dir: Path) -> list[dict[str, Any]]:
    path = stage_dir / "drills" / "drills.json"
    if not path.is_file():
        return []
    rows = []
    for number, outcome in enumerate(json.loads(path.read_text(encoding="utf-8")).get("outcomes", {}).get("shrink", []), 1):
        for point in outcome.get("loss_vs_twin", []):
            rows.append({"drill": f"shrink #{number}", "step": point["step"],
                         f"loss on {outcome['ranks_after']} rank(s)": point["loss"],
                         f"twin on {outcome['ranks_before']}": point["twin_loss"]})
    return rows


def _skipped_rows(stage_dir: Path) -> list[dict[str, Any]]:
    path = stage_dir / "drills" / "drills.json"
    if not path.is_file():
        return []
    rows = []
    for kind, outcomes in json.loads(path.read_text(encoding="utf-8")).get("outcomes", {}).items():
        for number, outcome in enumerate(outcomes, 1):
            for checkpoint, reason in outcome.get("skipped_checkpoints") or []:
                rows.append({"drill": f"{kind} #{number}", "checkpoint skipped": Path(str(checkpoint)).name,
                             "why": reason, "resumed from": Path(str(outcome.get("resumed_from") or "-")).name})
    return rows


def report(stage_dir: Path, metrics: Metrics) -> Optional[list[ReportItem]]:
    rows = report_table(metrics)
    if not rows:
        return None
    items = [ReportItem(title="Fault drills", table=rows)]
    skipped = _skipped_rows(stage_dir)
    if skipped:
        items.append(ReportItem(title="Checkpoints never loaded (torn or corrupt) and what was loaded instead",
                                table=skipped))
    shrink = _shrink_rows(stage_dir)
    if shrink:
        outcomes = json.loads((stage_dir / "drills" / "drills.json").read_text(encoding="utf-8"))["outcomes"]["shrink"]
        items.append(ReportItem(title="Restart on fewer ranks: loss after the resume beside the twin's", table=shrink,
                                text="\n".join(shrink_line(n, o) for n, o in enumerate(outcomes, 1))))
    return items


# -- the command ------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", help=f"drill kind(s), comma separated: {', '.join(KINDS)}; or autoscale "
                        f"(the serving fleet: a ramp through an autoscaled replica pool)")
    parser.add_argument("config", nargs="?", default="tiny-dense", help="train preset or TOML (default: tiny-dense)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: runs/drill-<time>)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each kind (random fault step each time)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault steps and ranks")
    parser.add_argument("--nproc", type=int, default=2, help="processes per training (default: 2)")
    parser.add_argument("--steps", type=int, default=24, help="training steps per run (default: 24)")
    parser.add_argument("--checkpoint-every", type=int, default=4, help="steps between checkpoints (default: 4)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per training run (default: 300)")
    parser.add_argument("--checkpoint", default=None,
                        help="canary drill: a trained checkpoint or run directory to serve (default: the drill's "
                             "tiny twin, without the degraded-model case)")


def _instead(args: argparse.Namespace) -> Optional[int]:
    if args.kind.strip() != "autoscale":
        return None
    from gonogo.stages.autoscale.stage import drill_command  # the serving fleet's drill: its own stage kind

    return int(drill_command(args))


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"kinds": [k.strip() for k in args.kind.split(",") if k.strip()], "config": args.config,
            "nproc": args.nproc, "steps": args.steps, "checkpoint_every": args.checkpoint_every,
            "repeat": args.repeat, "seed": args.seed, "timeout_s": args.timeout, "checkpoint": args.checkpoint}


def _summary(args: argparse.Namespace, stage_dir: Path, metrics: Metrics) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    rows = report_table(metrics)
    if rows:
        table = Table(title=f"gonogo drill {args.kind}")
        for column in rows[0]:
            table.add_column(column)
        for row in rows:
            table.add_row(*[str(value) for value in row.values()])
        Console().print(table)
    for row in _skipped_rows(stage_dir):
        console.print(f"{row['drill']}: skipped {row['checkpoint skipped']} ({row['why']}); "
                      f"resumed from {row['resumed from']}")
    for kind, summary in (metrics.get("drills") or {}).items():
        if summary.get("note"):
            console.print(f"{kind}: {summary['note']}")
    path = stage_dir / "drills" / "drills.json"
    outcomes = json.loads(path.read_text(encoding="utf-8")).get("outcomes", {}) if path.is_file() else {}
    for number, outcome in enumerate(outcomes.get("hang", []), 1):
        console.print(f"hang #{number}: {outcome.get('what_hung') or 'no triage bundle'}"
                      + (f" ({outcome['triage_bundle']})" if outcome.get("triage_bundle") else ""))
    for number, outcome in enumerate(outcomes.get("shrink", []), 1):
        console.print(shrink_line(number, outcome), markup=False)


def default_gates(settings: DrillSettings) -> list[str]:
    """Every drill recovered; the straggler drill named the slow rank; the hang drill's triage
    named the rank and frame."""
    return (["recovered == true"] + (["straggler_detected == true"] if "straggler" in settings.kinds else [])
            + (["triage_named == true"] if "hang" in settings.kinds else []))


STAGE = StageKind(
    name="drill",
    description="fault drills: kill / hang / straggler / NaN / torn or corrupt checkpoint / shrink / canary, each beside "
                "a fault-free twin: detected, recovered, steps lost, weights bitwise equal",
    settings=DrillSettings,
    metrics=_metrics,
    run=run,
    report=report,
    devices=lambda settings: settings.nproc,
    default_gates=default_gates,
    command=StageCommand(add_arguments=add_arguments, settings=_settings, summary=_summary, instead=_instead),
)
