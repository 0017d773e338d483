"""Stage kind ``soak`` and ``gonogo soak``: training held for a wall-clock window, watched over time.

The playbook validates checkpoint performance over a 24-hour window, GPU busy over 30-minute
windows and the loss with a 1M-token probe every N hours. A soak is that, scaled: the workers
(torchrun, like ``train``) train for ``duration_s`` of wall time, save a checkpoint every
``checkpoint_every_s`` with retention (``keep_latest_k``), run a held-out loss probe over
``probe_tokens`` tokens every ``probe_every_s``, and close a window every ``window_s`` with its
utilisation, busy share (time in training steps over wall time), checkpoint durations and the
process's resident memory. The parent turns that timeline into the gated figures:

- ``checkpoint_drift_max``: the largest window's median checkpoint duration over the first
  window's median (the baseline); a store that slows down over the soak shows here;
- ``busy_share_min`` and ``utilization_min_pct``: the worst window;
- ``probe_on_track``: every probe's loss at most ``probe_tolerance`` above the best before it;
- ``rss_growth_MB``: resident memory of rank 0, last window against the first;
- ``retention_ok``: at most ``keep_latest_k`` committed checkpoints left.

A slow store is injected with ``slow_store_s`` (or ``GONOGO_SOAK_SLOW_STORE_S``): that many
seconds are added to every checkpoint commit after the first window, inside the checkpoint write.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from pydantic import Field

from gonogo.errors import StageFailed, UserError
from gonogo.rundir import write_json_atomic
from gonogo.stages.base import Metrics, ReportItem, StageContext, StageCommand, StageKind, StageSettings

log = logging.getLogger(__name__)

SLOW_STORE_ENV = "GONOGO_SOAK_SLOW_STORE_S"
TIMELINE = "soak.json"
METRICS = {"soak_seconds", "checkpoint_warmup_s", "steps", "windows", "checkpoints", "checkpoint_p50_s", "checkpoint_p99_s",
           "checkpoint_baseline_s", "checkpoint_drift_max", "busy_share_min", "utilization_min_pct",
           "probes", "probe_loss_first", "probe_loss_last", "probe_on_track", "rss_growth_MB",
           "checkpoints_kept", "retention_ok", "slow_store_s"}


class SoakSettings(StageSettings):
    config: str = "tiny-dense"                     # train preset word or TOML path (relative to the plan)
    overrides: dict[str, Any] | list[str] = Field(default_factory=dict)
    nproc: int = Field(default=1, ge=1)
    duration_s: float = Field(default=300.0, gt=0)       # the soak window (24 h on a cluster)
    window_s: float = Field(default=60.0, gt=0)          # the utilisation window (30 min on a cluster)
    checkpoint_every_s: float = Field(default=10.0, gt=0)
    keep_latest_k: int = Field(default=3, ge=1)
    probe_every_s: float = Field(default=60.0, gt=0)     # the scheduled probe (every N hours on a cluster)
    probe_tokens: int = Field(default=16384, ge=1)       # 1M tokens on a cluster
    probe_tolerance: float = Field(default=0.05, ge=0)   # a probe may be this share above the best before it
    slow_store_s: float = Field(default=0.0, ge=0)       # injected: seconds added to each commit after window 1
    timeout_s: float = Field(default=0.0, ge=0)          # 0: duration + 600 s for start-up and the end


# -- the analysis (parent side, pure) ---------------------------------------------------------------

def _percentile(values: list[float], q: float) -> Optional[float]:
    from gonogo.rollout.analysis import percentile

    return percentile(values, q)


def analyse(timeline: dict[str, Any], settings: SoakSettings) -> Metrics:
    """The gated figures of a soak timeline; a figure with no samples is None with its reason."""
    windows = timeline["windows"]
    checkpoints = timeline["checkpoints"]
    probes = timeline["probes"]
    unknown: dict[str, str] = {}
    durations = [c["seconds"] for c in checkpoints]
    metrics: Metrics = {
        "soak_seconds": timeline["seconds"], "steps": timeline["steps"], "windows": len(windows),
        "checkpoints": len(checkpoints), "checkpoint_p50_s": _percentile(durations, 50),
        "checkpoint_p99_s": _percentile(durations, 99), "probes": len(probes),
        "slow_store_s": timeline.get("slow_store_s", 0.0),
        "checkpoint_warmup_s": timeline.get("checkpoint_warmup_s"),
    }
    by_window: dict[int, list[float]] = {}
    for checkpoint in checkpoints:
        by_window.setdefault(checkpoint["window"], []).append(checkpoint["seconds"])
    baseline = _percentile(by_window.get(0, []), 50)
    metrics["checkpoint_baseline_s"] = baseline
    later = [p50 for index, values in sorted(by_window.items())
             if index > 0 and (p50 := _percentile(values, 50)) is not None]
    for window in windows:
        window["checkpoint_p50_s"] = _percentile(by_window.get(window["index"], []), 50)
        window["drift"] = (None if baseline is None or window["checkpoint_p50_s"] is None
                           else window["checkpoint_p50_s"] / baseline)
    if baseline is None:
        metrics["checkpoint_drift_max"] = None
        unknown["checkpoint_drift_max"] = "no checkpoint in the first window (the baseline); shorten checkpoint_every_s"
    elif not later:
        metrics["checkpoint_drift_max"] = None
        unknown["checkpoint_drift_max"] = "no checkpoint after the first window; lengthen duration_s"
    else:
        metrics["checkpoint_drift_max"] = max(later) / baseline if baseline > 0 else None
    full = [w for w in windows if not w.get("partial")]
    busy = [w["busy_share"] for w in full if w.get("busy_share") is not None]
    metrics["busy_share_min"] = min(busy) if busy else None
    if not busy:
        unknown["busy_share_min"] = "no full window closed; lengthen duration_s or shorten window_s"
    utilization = [w["utilization_pct"] for w in full if w.get("utilization_pct") is not None]
    metrics["utilization_min_pct"] = min(utilization) if utilization else None
    if not utilization:
        unknown["utilization_min_pct"] = "the device utilisation could not be read (no NVML / no /proc)"
    losses = [p["loss"] for p in probes]
    metrics["probe_loss_first"] = losses[0] if losses else None
    metrics["probe_loss_last"] = losses[-1] if losses else None
    if len(losses) < 2:
        metrics["probe_on_track"] = None
        unknown["probe_on_track"] = f"{len(losses)} probe(s): the track needs two; lengthen duration_s or shorten probe_every_s"
    else:
        metrics["probe_on_track"] = all(
            loss <= min(losses[:index]) * (1 + settings.probe_tolerance) for index, loss in enumerate(losses) if index)
    rss = [w["rss_MB"] for w in windows if w.get("rss_MB") is not None]
    metrics["rss_growth_MB"] = rss[-1] - rss[0] if len(rss) >= 2 else None
    if len(rss) < 2:
        unknown["rss_growth_MB"] = "fewer than two windows with a memory reading"
    kept = timeline.get("checkpoints_kept")
    metrics["checkpoints_kept"] = kept
    metrics["retention_ok"] = None if kept is None else 1 <= kept <= settings.keep_latest_k
    if kept is None:
        unknown["retention_ok"] = "the checkpoint folder could not be listed"
    if unknown:
        metrics["unknown"] = unknown
    return metrics


# -- the workers ------------------------------------------------------------------------------------

def _rss_mb() -> Optional[float]:
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def worker(job_path: Path) -> int:
    """The torchrun entry: train for the window, checkpoint, probe, close windows; rank 0 writes the timeline."""
    import torch
    import torch.distributed as dist

    from gonogo.data.loader import PackedLoader, ValidationBatches
    from gonogo.train import loop
    from gonogo.checkpoints.checkpointer import Checkpointer
    from gonogo.train.config import TrainConfig, gradient_accumulation
    from gonogo.train.telemetry import make_utilization
    from gonogo.parallel import build_meshes, clip_grad_norm, init_distributed, leave_together

    job = json.loads(job_path.read_text(encoding="utf-8"))
    config = TrainConfig.model_validate(job["config"])
    soak = SoakSettings.model_validate(job["soak"])
    settings = config.train
    world = init_distributed(settings.init_timeout_s)
    stage_dir, run_dir = Path(job["stage_dir"]), Path(job["run_dir"])
    from gonogo.events import events_file, write_event

    def event(name: str, **fields: Any) -> None:
        if world.rank == 0:
            write_event(events_file(run_dir), job["stage"], rank=0, event=name, **fields)

    try:
        loop.check_world(config, world.world_size)
        loop.set_determinism(settings)
        build_meshes(world, settings.expert_parallel)
        accumulation = gradient_accumulation(settings, world.world_size)
        model = loop.build_model(config.model, config, world)
        optimizer = loop.build_optimizer(model, settings, world)
        scheduler = loop.build_scheduler(optimizer, settings)
        loader = PackedLoader(config.data.open_source("train"), settings.seq_len, settings.micro_batch_size,
                              world.rank, world.world_size, config.data.seed)
        per_batch = settings.seq_len * settings.micro_batch_size * world.world_size
        probe_batches = ValidationBatches(config.data.open_source("val"), settings.seq_len,
                                          settings.micro_batch_size, max(1, math.ceil(soak.probe_tokens / per_batch)),
                                          world.rank, world.world_size, config.data.seed)
        probe_tokens = max(1, math.ceil(soak.probe_tokens / per_batch)) * per_batch
        started = slow_after = math.inf  # set when the clock starts, after the warm-up

        class SlowStore(Checkpointer):
            """The checkpoint store, slowed on purpose after the first window when asked to."""

            def _commit(self, *args: Any, **kwargs: Any) -> Any:
                if soak.slow_store_s and time.monotonic() >= slow_after:
                    time.sleep(soak.slow_store_s)
                return super()._commit(*args, **kwargs)

        store = SlowStore(run_dir / "checkpoints" / job["stage"], keep_last=soak.keep_latest_k)
        utilization = make_utilization(world.device.type, world.local_rank, [os.getpid()]) if world.rank == 0 else None
        timeline: dict[str, Any] = {"windows": [], "checkpoints": [], "probes": [],
                                    "slow_store_s": soak.slow_store_s, "probe_tokens": probe_tokens}
        event("soak_started", duration_s=soak.duration_s, window_s=soak.window_s,
              checkpoint_every_s=soak.checkpoint_every_s, slow_store_s=soak.slow_store_s)

        def probe(step: int, now: float) -> None:
            loss = loop.evaluate(model, probe_batches, config, world)
            timeline["probes"].append({"t": round(now - started, 3), "step": step, "loss": loss})
            event("soak_probe", step=step, loss=loss, tokens=probe_tokens)

        window = {"index": 0, "start": 0.0, "busy": 0.0, "steps": 0}

        def close_window(now: float) -> None:
            wall = now - started - window["start"]
            record = {"index": window["index"], "start_s": round(window["start"], 3), "seconds": round(wall, 3),
                      # the last window is cut by the end of the soak: shown, but no worst case of its own
                      "partial": wall < 0.5 * soak.window_s,
                      "steps": window["steps"], "busy_share": window["busy"] / wall if wall > 0 else None,
                      "utilization_pct": utilization.sample() if utilization is not None else None,
                      "rss_MB": _rss_mb(),
                      "tokens_per_second": window["steps"] * settings.global_batch_size * settings.seq_len / wall
                      if wall > 0 else None}
            timeline["windows"].append(record)
            event("soak_window", **record)

        iterator = iter(loader)
        step = 0

        def train_step() -> None:
            for micro in range(accumulation):
                inputs, targets = next(iterator)
                inputs, targets = inputs.to(world.device), targets.to(world.device)
                with loop.set_gradient_sync(model, config, enabled=micro == accumulation - 1):
                    with loop.autocast(config, world):
                        logits = model(inputs)
                    (loop.language_model_loss(logits, targets) / accumulation).backward()
            clip_grad_norm(model, settings.grad_clip, world)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

        # warm-up outside the clock: the first step and the first save pay one-time costs (kernels,
        # imports, allocator) that are no part of the steady state the baseline stands for
        train_step()
        step += 1
        begun = time.monotonic()
        store.save(step, model, optimizer, scheduler, loader.state_dict(), {"soak": True}, config.model,
                   meta={"train": settings.model_dump(mode="json")})
        timeline["checkpoint_warmup_s"] = time.monotonic() - begun
        started = time.monotonic()
        slow_after = started + soak.window_s
        if utilization is not None:
            utilization.sample()
        probe(step, time.monotonic())
        next_checkpoint = started + soak.checkpoint_every_s
        next_probe = started + soak.probe_every_s
        while True:
            # rank 0's clock decides for every rank (stop, checkpoint, probe, window), in one all_reduce
            now = time.monotonic()
            flags = torch.zeros(4, dtype=torch.float64, device=world.device)
            if world.rank == 0:
                flags[0] = float(now - started >= soak.duration_s)
                flags[1] = float(now >= next_checkpoint)
                flags[2] = float(now >= next_probe)
                flags[3] = float(int((now - started) // soak.window_s) > window["index"])
            dist.all_reduce(flags)
            if flags[3] or flags[0]:
                close_window(now)
                window.update(index=window["index"] + 1, start=now - started, busy=0.0, steps=0)
            if flags[0]:
                break
            if flags[1]:
                begun = time.monotonic()
                store.save(step, model, optimizer, scheduler, loader.state_dict(), {"soak": True}, config.model,
                           meta={"train": settings.model_dump(mode="json")})
                seconds = time.monotonic() - begun
                timeline["checkpoints"].append({"t": round(begun - started, 3), "step": step, "seconds": seconds,
                                                "window": int((begun - started) // soak.window_s)})
                event("soak_checkpoint", step=step, seconds=seconds)
                next_checkpoint = max(next_checkpoint + soak.checkpoint_every_s, time.monotonic())
            if flags[2]:
                probe(step, time.monotonic())
                next_probe = max(next_probe + soak.probe_every_s, time.monotonic())
            begun = time.monotonic()
            step += 1
            train_step()
            window["busy"] += time.monotonic() - begun
            window["steps"] += 1
        store.close()
        timeline["steps"] = step
        timeline["seconds"] = round(time.monotonic() - started, 3)
        if world.rank == 0:
            from gonogo.checkpoints import manifest

            root = store.root
            timeline["checkpoints_kept"] = (
                sum(1 for p in root.iterdir() if p.is_dir() and manifest.is_committed(p)) if root.is_dir() else None)
            write_json_atomic(stage_dir / TIMELINE, timeline)
            event("soak_finished", steps=step, checkpoints=len(timeline["checkpoints"]),
                  checkpoints_kept=timeline["checkpoints_kept"])
        dist.barrier()
        leave_together(dist, world.world_size)  # as the trainer's workers: no rank tears its pairs down early
    finally:
        dist.destroy_process_group()
    return 0


# -- the stage --------------------------------------------------------------------------------------

def run(ctx: StageContext, settings: SoakSettings) -> Metrics:
    from gonogo.cluster.torchrun import torchrun_command, torchrun_env
    from gonogo.train.config import load_train_config, overrides_list

    preset = settings.config
    if preset.endswith(".toml") or "/" in preset:
        preset = str(ctx.resolve_path(preset))
    config, _ = load_train_config(preset, overrides_list(settings.overrides))
    # the soak ends on the clock, never on a step count: the schedule must not run out before it
    config = config.model_copy(update={"train": config.train.model_copy(update={"steps": 10**9})})
    from gonogo.stages.train.stage import preflight

    preflight(config, settings.nproc, "never")
    slow = os.environ.get(SLOW_STORE_ENV)
    if slow:
        try:
            settings = settings.model_copy(update={"slow_store_s": float(slow)})
        except ValueError:
            raise UserError(f"{SLOW_STORE_ENV}={slow!r}: give seconds as a number, e.g. 2.0") from None
    if settings.checkpoint_every_s >= settings.window_s:
        raise UserError(f"stage {ctx.name!r}: checkpoint_every_s ({settings.checkpoint_every_s:g}) must be below "
                        f"window_s ({settings.window_s:g}), so the first window has a baseline checkpoint")
    job_path = ctx.stage_dir / "soak-job.json"
    write_json_atomic(job_path, {"config": config.model_dump(mode="json"), "soak": settings.model_dump(mode="json"),
                                 "stage": ctx.name, "stage_dir": str(ctx.stage_dir.resolve()),
                                 "run_dir": str(ctx.run_dir.root.resolve())})
    (ctx.stage_dir / TIMELINE).unlink(missing_ok=True)
    extra = {} if "OMP_NUM_THREADS" in os.environ else {
        "OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // settings.nproc))}
    argv = torchrun_command("gonogo.stages.soak.stage", [str(job_path)], settings.nproc)
    timeout = settings.timeout_s or settings.duration_s + 600
    ctx.progress(f"soak {settings.duration_s:g} s, checkpoint every {settings.checkpoint_every_s:g} s")
    code = ctx.run_command(argv, timeout=timeout, log_name="soak.log", env=torchrun_env(extra))
    path = ctx.stage_dir / TIMELINE
    if code != 0 or not path.is_file():
        raise StageFailed(f"the soak workers exited with code {code}; see {ctx.stage_dir / 'soak.log'}")
    timeline = json.loads(path.read_text(encoding="utf-8"))
    metrics = analyse(timeline, settings)
    write_json_atomic(path, timeline)  # with each window's drift filled in, for the report
    return metrics


def report(stage_dir: Path, metrics: Metrics) -> list[ReportItem]:
    from gonogo.plots import new_figure, to_png

    path = stage_dir / TIMELINE
    if not path.is_file():
        return []
    timeline = json.loads(path.read_text(encoding="utf-8"))
    items = []
    checkpoints = timeline["checkpoints"]
    if checkpoints:
        figure, axes = new_figure()
        axes.plot([c["t"] for c in checkpoints], [c["seconds"] for c in checkpoints], "o-", label="checkpoint")
        if metrics.get("checkpoint_baseline_s") is not None:
            axes.axhline(metrics["checkpoint_baseline_s"], linestyle="--", color="grey", label="first-window median")
        axes.set_xlabel("soak time (s)")
        axes.set_ylabel("checkpoint duration (s)")
        axes.legend()
        items.append(ReportItem("checkpoint duration over the soak", png=to_png(figure)))
    windows = timeline["windows"]
    if windows:
        figure, axes = new_figure()
        axes.plot([w["index"] for w in windows], [w["busy_share"] for w in windows], "o-", label="busy share")
        if any(w.get("utilization_pct") is not None for w in windows):
            axes.plot([w["index"] for w in windows], [(w["utilization_pct"] or 0) / 100 for w in windows], "s-",
                      label="device utilisation")
        axes.set_ylim(0, 1.05)
        axes.set_xlabel(f"window ({timeline['windows'][0]['seconds']:.0f} s each)")
        axes.legend()
        items.append(ReportItem("utilisation per window", png=to_png(figure)))
        items.append(ReportItem("windows", table=[
            {"window": w["index"], "seconds": w["seconds"], "steps": w["steps"], "busy share": w["busy_share"],
             "utilisation %": w.get("utilization_pct"), "checkpoint p50 s": w.get("checkpoint_p50_s"),
             "drift": w.get("drift"), "RSS MB": w.get("rss_MB")} for w in windows]))
    from gonogo.events import events_file, read_events

    events = []
    for record in read_events(events_file(stage_dir.parent.parent), stage=stage_dir.name, metrics=False):
        if str(record.kind).startswith("soak_"):
            events.append({"event": record.kind, "details": ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.fields().items())[:160]})
    if events:
        items.append(ReportItem(f"events ({len(events)})", table=events[:300]))
    probes = timeline["probes"]
    if probes:
        figure, axes = new_figure()
        axes.plot([p["t"] for p in probes], [p["loss"] for p in probes], "o-")
        axes.set_xlabel("soak time (s)")
        axes.set_ylabel(f"held-out loss ({timeline.get('probe_tokens', 0):,} tokens)")
        items.append(ReportItem("scheduled loss probe", png=to_png(figure)))
    return items


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("preset", nargs="?", default="tiny-dense", help="train preset word or TOML path")
    parser.add_argument("--minutes", type=float, default=5.0, help="the soak window (default: 5)")
    parser.add_argument("--window", type=float, default=60.0, help="seconds per utilisation window (default: 60)")
    parser.add_argument("--checkpoint-every", type=float, default=10.0, help="seconds between checkpoints")
    parser.add_argument("--keep", type=int, default=3, help="committed checkpoints kept (retention)")
    parser.add_argument("--probe-every", type=float, default=60.0, help="seconds between loss probes")
    parser.add_argument("--probe-tokens", type=int, default=16384, help="held-out tokens per probe")
    parser.add_argument("--max-drift", type=float, default=1.5, help="gate: checkpoint drift at most this")
    parser.add_argument("--min-busy", type=float, default=0.5, help="gate: busy share of every window at least this")
    parser.add_argument("--slow-store", type=float, default=0.0,
                        help="inject: seconds added to each checkpoint write after the first window")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: runs/soak-<time>)")


def gates(max_drift: float = 1.5, min_busy: float = 0.5) -> list[str]:
    """What a soak must show: checkpoint time that does not drift, busy windows, a loss probe on
    track and the retention kept."""
    return [f"checkpoint_drift_max <= {max_drift}", f"busy_share_min >= {min_busy}",
            "probe_on_track == true", "retention_ok == true"]


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    if args.minutes <= 0:
        raise UserError(f"--minutes {args.minutes}: must be above 0")
    return {"config": args.preset, "nproc": args.nproc, "duration_s": args.minutes * 60, "window_s": args.window,
            "checkpoint_every_s": args.checkpoint_every, "keep_latest_k": args.keep,
            "probe_every_s": args.probe_every, "probe_tokens": args.probe_tokens, "slow_store_s": args.slow_store}


def _summary(args: argparse.Namespace, stage_dir: Path, metrics: Metrics) -> None:
    from rich.console import Console

    console = Console()
    for key in ("checkpoints", "checkpoint_p50_s", "checkpoint_p99_s", "checkpoint_baseline_s", "checkpoint_drift_max",
                "busy_share_min", "utilization_min_pct", "probes", "probe_loss_first", "probe_loss_last",
                "probe_on_track", "rss_growth_MB", "checkpoints_kept", "retention_ok"):
        value = metrics.get(key)
        console.print(f"  {key:24} {'—' if value is None else (f'{value:.4g}' if isinstance(value, float) else value)}")


STAGE = StageKind(
    name="soak",
    description="training held for a wall-clock window: checkpoint drift, utilisation per window, loss probes, memory",
    settings=SoakSettings,
    metrics=lambda settings: set(METRICS),
    run=run,
    report=report,
    devices=lambda settings: settings.nproc,
    default_gates=lambda settings: gates(),
    command=StageCommand(add_arguments=add_arguments, settings=_settings, summary=_summary,
                         gates=lambda args: gates(args.max_drift, args.min_busy)),
)


# -- gonogo soak ------------------------------------------------------------------------------------


if __name__ == "__main__":  # the torchrun entry
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    raise SystemExit(worker(Path(sys.argv[1])))
