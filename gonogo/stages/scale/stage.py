"""The ``scale`` stage kind and ``gonogo scale CONFIG --nproc 1,2,4``: one training job at several
process counts, strong and weak scaling.

    strong scaling: the global batch stays fixed (each rank does 1/n of it)
    weak scaling:   the per-rank batch stays fixed (the global batch grows with n)

For both, with tps(n) the global tokens/s at n processes (rank 0's steady-state median, set by
the slowest rank) and b the smallest process count of the list (normally 1):

    efficiency(n) = (tps(n) / n) / (tps(b) / b)        (= tps(n) / (n * tps(1)) when b = 1)

Per-rank step-time spread = (max - min) / median of the ranks' median step times, after the
first log window (start-up) is dropped. Collective share: a *no-communication twin* of every
multi-process run — the same n processes on the same cores, each training its own per-rank
batch alone (``parallel=none``, world size 1) — gives the step time without collectives;
``collective_share = max(0, 1 - twin_step_time / run_step_time)``. It counts everything the
distributed run pays for being distributed: all-gather / reduce-scatter time, waiting for the
slowest rank, and FSDP's bookkeeping.

Fair thread budget: every process of every run (the one-process run and the twins included)
gets the same OMP_NUM_THREADS = cores // max(nproc), so adding a process means adding a
"device" with the same resources, as it does on a GPU node. When max(nproc) x threads is more
than the cores (or max(nproc) more than the GPUs) the result is flagged ``oversubscribed``: it
then measures contention, not scaling. A hung collective fails the stage (not the plan): every
collective is bounded by ``collective_timeout_s`` and every run by ``timeout_s``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

from pydantic import Field, field_validator

from gonogo.errors import StageFailed, UserError
from gonogo.rundir import RunDir
from gonogo.stages.base import Metrics, ReportItem, StageContext, StageCommand, StageKind, StageSettings

if TYPE_CHECKING:
    from gonogo.events import Event

MODES = ("strong", "weak")
TWIN_MODULE = "gonogo.stages.scale.stage"


class ScaleSettings(StageSettings):
    config: str = "tiny-dense"                     # a preset word or a TOML path (relative to the plan)
    nproc: list[int] = Field(default_factory=lambda: [1, 2])
    mode: Literal["strong", "weak", "both"] = "both"
    steps: int = Field(default=30, ge=2)           # optimizer steps of each run
    log_every: int = Field(default=5, ge=1)        # one timing window per log step; the first is dropped
    overrides: Union[dict[str, Any], list[str]] = Field(default_factory=dict)
    twin: bool = True                              # run the no-communication twins (collective_share)
    threads_per_process: Optional[int] = Field(default=None, ge=1)  # default: cores // max(nproc)
    collective_timeout_s: float = Field(default=120.0, gt=0)        # bound on every collective
    timeout_s: float = Field(default=900.0, gt=0)                   # bound on each run

    @field_validator("nproc")
    @classmethod
    def _counts(cls, value: list[int]) -> list[int]:
        if not value or any(n < 1 for n in value):
            raise ValueError("nproc must list process counts >= 1, e.g. [1, 2, 4]")
        return sorted(set(value))

    @property
    def modes(self) -> tuple[str, ...]:
        return MODES if self.mode == "both" else (self.mode,)


def parse_nproc(text: str) -> list[int]:
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        raise UserError(f"--nproc {text}: give process counts >= 1 separated by commas, e.g. --nproc 1,2,4")
    return counts


def stage_metrics(settings: ScaleSettings) -> set[str]:
    names = {"oversubscribed", "at_core_limit", "threads_per_process", "step_time_spread"}
    if settings.twin:
        names.add("collective_share")
    for mode in settings.modes:
        names.add(f"{mode}_scaling_efficiency")
        for n in settings.nproc:
            names |= {f"{mode}_tokens_per_second_n{n}", f"{mode}_efficiency_n{n}"}
    return names


# -- what to run ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSpec:
    nproc: int
    global_batch: int
    micro_batch: int
    twin: bool = False           # n independent one-process trainings of global_batch each

    @property
    def label(self) -> str:
        return f"{'twin' if self.twin else 'run'}-n{self.nproc}-b{self.global_batch}"


def plan_runs(config, settings: ScaleSettings) -> tuple[dict[tuple[str, int], RunSpec], dict[RunSpec, RunSpec]]:
    """The run of every (mode, n), and each multi-process run's twin (identical runs are shared).

    One micro-batch size m for every run, so each forward does the same work:
    m = min(train.micro_batch_size, global batch // max n). Strong runs keep the config's
    global batch G (each rank: G/n); weak runs give each rank one micro-batch (global m x n).
    """
    train = config.train
    largest = max(settings.nproc)
    micro = min(train.micro_batch_size, train.global_batch_size // largest)
    if micro < 1:
        raise UserError(f"train.global_batch_size={train.global_batch_size} is smaller than the largest "
                        f"process count {largest}; raise train.global_batch_size")
    runs: dict[tuple[str, int], RunSpec] = {}
    for mode in settings.modes:
        for n in settings.nproc:
            if mode == "strong":
                if train.global_batch_size % (micro * n):
                    raise UserError(f"strong scaling keeps train.global_batch_size={train.global_batch_size}, which "
                                    f"{n} processes x micro-batch {micro} do not divide; choose a global batch that "
                                    f"is a multiple of {micro} x every process count")
                runs[(mode, n)] = RunSpec(n, train.global_batch_size, micro)
            else:
                runs[(mode, n)] = RunSpec(n, micro * n, micro)
    twins = {}
    if settings.twin:
        for spec in set(runs.values()):
            if spec.nproc > 1:
                twins[spec] = RunSpec(spec.nproc, spec.global_batch // spec.nproc, micro, twin=True)
    return runs, twins


def machine_budget(nprocs: list[int], threads: Optional[int]) -> dict[str, Any]:
    """Threads per process and whether the largest run fits this machine's cores / GPUs."""
    cores = len(os.sched_getaffinity(0))
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    largest = max(nprocs)
    threads = threads or max(1, cores // largest)
    if gpus:
        used, have, unit = largest, gpus, "GPU"
    else:
        used, have, unit = largest * threads, cores, "core"
    oversubscribed, at_limit = used > have, used == have
    if oversubscribed:
        note = (f"oversubscribed: {largest} processes need {used} {unit}s but this machine has {have}; the "
                f"largest counts measure contention for the same {unit}s, not scaling")
    elif at_limit:
        note = (f"{largest} processes x {threads if not gpus else 1} {'thread' if not gpus else 'GPU'} use all "
                f"{have} {unit}s: this is the limit of this machine; more processes would be oversubscribed")
    else:
        note = f"{largest} processes use {used} of {have} {unit}s"
    return {"cores": cores, "gpus": gpus, "threads_per_process": threads, "oversubscribed": oversubscribed,
            "at_core_limit": at_limit, "machine_note": note}


def run_config(config, spec: RunSpec, settings: ScaleSettings):
    """The training config of one run: its batch, no checkpoints, validation only at the end."""
    train = config.train.model_copy(update={
        "steps": settings.steps, "log_every": settings.log_every, "val_every": 0, "checkpoint": False,
        "global_batch_size": spec.global_batch, "micro_batch_size": spec.micro_batch,
        "warmup_steps": min(config.train.warmup_steps, settings.steps - 1),
        "init_timeout_s": settings.collective_timeout_s})
    if spec.twin:
        train = train.model_copy(update={"parallel": "none", "expert_parallel": 1})
    return config.model_copy(update={"train": train})


# -- running --------------------------------------------------------------------------------------

def _runner(directory: Path, threads: int):
    """A run_command that logs into the run's own folder and gives every worker the same threads."""
    from gonogo.procs import ProcessTimeout, run_process

    def run(argv, *, timeout, log_name, env=None, on_line=None) -> int:
        env = dict(env if env is not None else os.environ)
        env["OMP_NUM_THREADS"] = str(threads)
        try:
            return run_process(argv, timeout=timeout, log_path=directory / log_name, env=env, on_line=on_line)
        except ProcessTimeout:
            raise StageFailed(f"scale {directory.name}: did not finish within {timeout:.0f} s and was stopped "
                              f"(a hung collective or a dead rank?); see {directory / log_name}") from None
    return run


def _fresh_run_dir(path: Path) -> RunDir:
    if path.exists():
        shutil.rmtree(path)  # a rerun of this stage: the old attempt's files are replaced
    return RunDir.create(path, plan_name="scale")


def run_distributed(config, spec: RunSpec, root: Path, threads: int, settings: ScaleSettings, ctx) -> Path:
    from gonogo.stages.train.stage import launch

    run_dir = _fresh_run_dir(root / spec.label)
    stage_dir = run_dir.stage_dir("train")
    launch(config, "scale.toml", spec.nproc, run_dir=run_dir, stage="train", stage_dir=stage_dir, resume="never",
           timeout_s=settings.timeout_s, run_command=_runner(stage_dir, threads),
           on_update=lambda update: ctx.progress(f"{spec.label}: step {update['step']}/{update['steps']}"))
    return run_dir.root


def run_twin(config, spec: RunSpec, root: Path, threads: int, settings: ScaleSettings) -> list[Path]:
    """n processes under one torchrun, each training alone (its own one-rank group)."""
    from gonogo.cluster.torchrun import torchrun_command, torchrun_env
    from gonogo.train.job import write_job

    twin_root = root / spec.label
    if twin_root.exists():
        shutil.rmtree(twin_root)
    twin_root.mkdir(parents=True)
    run_dirs = []
    for local_rank in range(spec.nproc):
        run_dir = RunDir.create(twin_root / f"process-{local_rank}", plan_name="scale-twin")
        write_job(twin_root / f"job-{local_rank}.json", config=config, config_filename="scale.toml",
                  run_dir=run_dir.root, stage="train", stage_dir=run_dir.stage_dir("train"), resume="never")
        run_dirs.append(run_dir.root)
    argv = torchrun_command(TWIN_MODULE, [str(twin_root)], spec.nproc)
    code = _runner(twin_root, threads)(argv, timeout=settings.timeout_s, log_name="torchrun.log", env=torchrun_env())
    missing = [d for d in run_dirs if not (d / "stages" / "train" / "result.json").is_file()]
    if code != 0 or missing:
        raise StageFailed(f"scale {spec.label}: the no-communication twin exited with code {code}; "
                          f"see {twin_root / 'torchrun.log'}")
    return run_dirs


def twin_main(argv: list[str]) -> int:
    """torchrun entry of a twin: this process leaves torchrun's group and trains alone."""
    twin_root = Path(argv[0])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # without MASTER_ADDR, init_distributed builds a one-rank group on a private file store;
    # LOCAL_RANK stays, so on a GPU node each twin process keeps its own GPU
    os.environ.pop("MASTER_ADDR", None)
    os.environ.pop("MASTER_PORT", None)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    from gonogo.train.worker import main

    return main([str(twin_root / f"job-{local_rank}.json")])


# -- measuring ------------------------------------------------------------------------------------

def _steady(lines: list[Event]) -> list[Event]:
    """Drop the first log window (start-up: allocation, first-touch, thread pools)."""
    first = min((line["step"] for line in lines), default=None)
    rest = [line for line in lines if line["step"] != first]
    return rest or lines


def timings(run_root: Path) -> dict[str, Any]:
    """Rank 0's global step time and tokens/s, and every rank's median step time (steady state)."""
    from gonogo.events import events_file, read_events

    lines = read_events(events_file(run_root))
    global_lines = _steady([line for line in lines if line.get("rank") == 0 and "step_time_s" in line])
    per_rank: dict[int, list[float]] = {}
    for line in _steady([line for line in lines if "step_time_s_rank" in line]):
        per_rank.setdefault(line["rank"], []).append(line["step_time_s_rank"])
    assert global_lines and per_rank, f"no timing lines in {events_file(run_root)}"
    rank_medians = [statistics.median(values) for values in per_rank.values()]
    return {"step_time_s": statistics.median(line["step_time_s"] for line in global_lines),
            "tokens_per_second": statistics.median(line["tokens_per_second"] for line in global_lines),
            "rank_step_times_s": rank_medians,
            "step_time_spread": (max(rank_medians) - min(rank_medians)) / statistics.median(rank_medians)}


def summarize(settings: ScaleSettings, runs: dict[tuple[str, int], RunSpec], measured: dict[RunSpec, dict],
              twin_step: dict[RunSpec, float]) -> Metrics:
    metrics: Metrics = {}
    table = []
    for mode in settings.modes:
        base_n = min(settings.nproc)
        base = measured[runs[(mode, base_n)]]["tokens_per_second"] / base_n
        for n in settings.nproc:
            spec = runs[(mode, n)]
            result = measured[spec]
            efficiency = result["tokens_per_second"] / n / base
            share = None
            if spec in twin_step:
                share = max(0.0, 1.0 - twin_step[spec] / result["step_time_s"])
            elif n == 1:
                share = 0.0  # one process: nothing to communicate
            metrics[f"{mode}_tokens_per_second_n{n}"] = result["tokens_per_second"]
            metrics[f"{mode}_efficiency_n{n}"] = efficiency
            table.append({"mode": mode, "nproc": n, "global_batch": spec.global_batch,
                          "tokens_per_second": result["tokens_per_second"], "efficiency": efficiency,
                          "step_time_s": result["step_time_s"], "step_time_spread": result["step_time_spread"],
                          "collective_share": share, "twin_step_time_s": twin_step.get(spec)})
        metrics[f"{mode}_scaling_efficiency"] = metrics[f"{mode}_efficiency_n{max(settings.nproc)}"]
    largest = [row for row in table if row["nproc"] == max(settings.nproc)]
    metrics["step_time_spread"] = max(row["step_time_spread"] for row in table)
    if settings.twin:
        shares = [row["collective_share"] for row in largest if row["collective_share"] is not None]
        metrics["collective_share"] = max(shares) if shares else None  # no twin measured: unknown, not 0
    metrics["runs"] = table
    return metrics


def run(ctx: StageContext, settings: ScaleSettings) -> Metrics:
    from gonogo.train.config import load_train_config, overrides_list

    preset = settings.config
    if preset.endswith(".toml") or "/" in preset:
        preset = str(ctx.resolve_path(preset))
    config, _ = load_train_config(preset, overrides_list(settings.overrides))
    runs, twins = plan_runs(config, settings)
    budget = machine_budget(settings.nproc, settings.threads_per_process)
    threads = budget["threads_per_process"]
    load_before = os.getloadavg()[0]
    root = ctx.stage_dir / "runs"
    measured: dict[RunSpec, dict] = {}
    for spec in sorted(set(runs.values()), key=lambda s: (s.nproc, s.global_batch)):
        ctx.progress(f"{spec.label} ({spec.nproc} process(es), global batch {spec.global_batch})")
        measured[spec] = timings(run_distributed(run_config(config, spec, settings), spec, root, threads, settings, ctx))
    twin_step: dict[RunSpec, float] = {}
    for spec, twin in sorted(twins.items(), key=lambda item: item[1].label):
        ctx.progress(f"{twin.label} (no-communication twin of {spec.label})")
        twin_dirs = run_twin(run_config(config, twin, settings), twin, root, threads, settings)
        twin_step[spec] = statistics.mean(timings(d)["step_time_s"] for d in twin_dirs)
    metrics = summarize(settings, runs, measured, twin_step)
    metrics.update(budget)
    metrics["load_average_before"] = load_before
    metrics["load_average_after"] = os.getloadavg()[0]
    return metrics


# -- the report -----------------------------------------------------------------------------------

def report(stage_dir: Path, metrics: Metrics) -> Optional[list[ReportItem]]:
    rows = metrics.get("runs")
    if not rows:
        return None
    from gonogo.plots import new_figure, to_png

    items = [ReportItem(title="Machine", text=metrics.get("machine_note", "") + (
        f". Load average before the runs: {metrics['load_average_before']:.1f} on {metrics.get('cores')} cores"
        " (other work on the machine lowers every number)." if metrics.get("load_average_before") is not None else ""))]
    modes = sorted({row["mode"] for row in rows})
    figure, axes = new_figure(6, 3.2)
    for mode in modes:
        mine = [row for row in rows if row["mode"] == mode]
        axes.plot([r["nproc"] for r in mine], [r["tokens_per_second"] for r in mine], "o-", label=f"{mode} scaling")
        base = mine[0]["tokens_per_second"] / mine[0]["nproc"]
        axes.plot([r["nproc"] for r in mine], [base * r["nproc"] for r in mine], ":", color="grey")
    axes.set_xlabel("processes")
    axes.set_ylabel("tokens / s (all ranks)")
    axes.legend(title="dotted: linear")
    items.append(ReportItem(title="Throughput vs processes", png=to_png(figure)))
    figure, axes = new_figure(6, 3.2)
    for mode in modes:
        mine = [row for row in rows if row["mode"] == mode]
        axes.plot([r["nproc"] for r in mine], [100 * r["efficiency"] for r in mine], "o-", label=f"{mode} scaling")
    axes.axhline(100, color="grey", linestyle=":")
    axes.set_ylim(bottom=0)
    axes.set_xlabel("processes")
    axes.set_ylabel("efficiency %")
    axes.legend()
    items.append(ReportItem(title="Scaling efficiency vs processes", png=to_png(figure)))
    items.append(ReportItem(title="Runs", table=[{key: _round(value) for key, value in row.items()} for row in rows]))
    return items


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


# -- the command ----------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gonogo.stage_cli import IntermixedParser

    parser.__class__ = IntermixedParser
    parser.add_argument("config", metavar="PRESET_OR_CONFIG", help="a preset word (tiny-dense, ...) or a TOML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.n_layers=2")
    parser.add_argument("--nproc", default="1,2", help="process counts, comma-separated (default: 1,2)")
    parser.add_argument("--mode", choices=["strong", "weak", "both"], default="both")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default: 30)")
    parser.add_argument("--log-every", type=int, default=5, help="steps per timing window (default: 5)")
    parser.add_argument("--no-twin", action="store_true",
                        help="skip the no-communication twins (no collective_share; faster)")
    parser.add_argument("--threads", type=int, default=None, help="threads per process (default: cores // max nproc)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before one run is stopped (default: 900)")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: a new folder under runs/)")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    data: dict[str, Any] = {"config": args.config, "nproc": parse_nproc(args.nproc), "mode": args.mode,
                            "steps": args.steps, "log_every": args.log_every, "overrides": list(args.overrides),
                            "twin": not args.no_twin, "timeout_s": args.timeout}
    if args.threads is not None:
        data["threads_per_process"] = args.threads
    return data


def _check(args: argparse.Namespace, settings: ScaleSettings) -> None:
    from gonogo.train.config import load_train_config, overrides_list

    config, _ = load_train_config(settings.config, overrides_list(settings.overrides))
    plan_runs(config, settings)  # batch splits that cannot work: one line now, not after the first run


def _summary(args: argparse.Namespace, stage_dir: Path, metrics: Metrics) -> None:
    from rich.console import Console
    from rich.table import Table

    if not metrics.get("runs"):
        return
    table = Table(title=f"gonogo scale {args.config} --nproc {args.nproc}")
    for column in ("mode", "nproc", "global batch", "tokens/s", "efficiency", "step s", "spread", "collective share"):
        table.add_column(column, justify="right")
    for row in metrics["runs"]:
        share = row["collective_share"]
        table.add_row(row["mode"], str(row["nproc"]), str(row["global_batch"]), f"{row['tokens_per_second']:,.0f}",
                      f"{100 * row['efficiency']:.0f}%", f"{row['step_time_s']:.3f}", f"{100 * row['step_time_spread']:.1f}%",
                      "-" if share is None else f"{100 * share:.0f}%")
    Console().print(table)
    Console().print(("[yellow]" if metrics["oversubscribed"] or metrics["at_core_limit"] else "") + metrics["machine_note"])


STAGE = StageKind(
    name="scale",
    description="the same training job at several process counts: strong and weak scaling efficiency, "
                "per-rank step-time spread, collective share, oversubscription check",
    settings=ScaleSettings,
    metrics=stage_metrics,
    run=run,
    report=report,
    devices=lambda settings: max(settings.nproc),
    command=StageCommand(add_arguments=add_arguments, settings=_settings, check=_check, summary=_summary),
)


if __name__ == "__main__":  # the twins' torchrun entry (and the guard an async checkpoint save needs)
    raise SystemExit(twin_main(sys.argv[1:]))
