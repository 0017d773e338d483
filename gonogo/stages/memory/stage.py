"""The stage kind ``memory`` (and ``gonogo train --find-max-batch``): the memory probe as a stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gonogo.train.memory_probe import find_max_batch


def _stage_parts():
    from pydantic import Field

    from gonogo.stages.base import StageSettings

    class MemorySettings(StageSettings):
        config: str = "tiny-dense"                  # a preset word or a TOML path (relative to the plan)
        nproc: int = Field(default=1, ge=1)
        overrides: list[str] = Field(default_factory=list)
        max_micro_batch: int = Field(default=1024, ge=1)
        max_trials: int = Field(default=16, ge=1)
        trial_steps: int = Field(default=2, ge=1)   # the first step allocates the optimizer state
        timeout_s: float = Field(default=1800.0, gt=0)

    return MemorySettings


MemorySettings = _stage_parts()
STAGE_METRICS = {"max_micro_batch_size", "recommended_micro_batch_size", "peak_GB_at_max", "limit_GB",
                 "memory_probe_exact", "memory_trials"}


def stage_metrics(result: dict[str, Any]) -> dict[str, Any]:
    return {"max_micro_batch_size": result["max_micro_batch_size"],
            "recommended_micro_batch_size": result["recommended_micro_batch_size"],
            "peak_GB_at_max": result["peak_GB_at_max"], "limit_GB": result["limit_GB"],
            # False: stopped at max_micro_batch or max_trials, so more may fit
            "memory_probe_exact": result["bounded_by"] is None, "memory_trials": len(result["trials"]),
            "probe": result}


def result_line(result: dict[str, Any]) -> str:
    largest = result["max_micro_batch_size"]
    limit = (f"{result['limit_GB']:.2f} GB ({result['limit_setting']})" if result.get("limit_GB")
             else "no limit (set train.memory_cap_GB on CPU)")
    if largest is None:
        return f"even micro_batch_size=1 does not fit in {limit}"
    bound = {"max_micro_batch": f"; the search stopped at its bound {largest}, more may fit",
             "max_trials": "; the search ran out of trials, more may fit"}.get(result["bounded_by"], "")
    return (f"largest micro-batch that fits: {largest} (peak {result['peak_GB_at_max']} GB of {limit}){bound}; "
            f"set train.micro_batch_size={result['recommended_micro_batch_size']} (the largest that divides "
            f"global_batch_size / ranks = {result['global_batch_size'] // result['world_size']})")


def run(ctx, settings) -> dict[str, Any]:
    from gonogo.train.config import load_train_config
    from gonogo.train.config import overrides_list

    preset = settings.config
    if preset.endswith(".toml") or "/" in preset:
        preset = str(ctx.resolve_path(preset))
    config, path = load_train_config(preset, overrides_list(settings.overrides))
    result = find_max_batch(config, path.name, settings.nproc, run_dir=ctx.run_dir.root, stage_dir=ctx.stage_dir,
                            timeout_s=settings.timeout_s, run_command=ctx.run_command,
                            max_micro_batch=settings.max_micro_batch, max_trials=settings.max_trials,
                            trial_steps=settings.trial_steps)
    ctx.progress(result_line(result))
    return stage_metrics(result)


def report(stage_dir: Path, metrics: dict[str, Any]):
    from gonogo.stages.base import ReportItem

    probe = metrics.get("probe") or {}
    rows = [{"micro_batch_size": t["micro_batch_size"], "fits": t["fits"], "peak GB": t["peak_GB"],
             "seconds": t["seconds"]} for t in probe.get("trials", [])]
    return [ReportItem(title="Memory probe: micro-batch sizes tried", table=rows)] if rows else None


def _make_stage():
    from gonogo.stages.base import StageKind

    return StageKind(name="memory",
                     description="the largest micro-batch that fits in memory (GPU memory, or train.memory_cap_GB "
                                 "on CPU), by doubling then bisection",
                     settings=MemorySettings, metrics=lambda settings: set(STAGE_METRICS), run=run,
                     report=report, devices=lambda settings: settings.nproc)


STAGE = _make_stage()
