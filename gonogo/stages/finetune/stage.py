"""Post-training: supervised finetuning (SFT) from a pretrained checkpoint, with the same trainer.

    gonogo finetune [CONFIG] --checkpoint DIR [--nproc N] [--out DIR] [key=value ...]

A finetune config (default ``sft-tiny``) has ``[data]`` and ``[train]`` tables only: the model's
shape comes from the checkpoint's meta.json and its weights start the run
(``train.init_from``). The data is chats (``data.format = "chat"``, gonogo.data.sft): the
built-in reasoning problems by default, or the user's JSONL; the loss covers only the
assistant's tokens (targets are -100 elsewhere). Everything else is pretraining's loop: FSDP2,
mixed precision, checkpoints in ``<run>/checkpoints/<stage>/`` and resume.

A user JSONL file is read here first, so its bad lines are reported (line number and what is
wrong) and counted (``skipped_lines``) before any worker starts, and a file whose good fraction
is below ``data.min_good_fraction`` stops the stage with exit 2 (UserError).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import Field

from gonogo.errors import UserError
from gonogo.rundir import RunDir, write_json_atomic
from gonogo.stages.base import Metrics, ReportItem, StageCommand, StageContext, StageKind, StageSettings
from gonogo.stages.train import stage as train_stage
from gonogo.train.config import TrainConfig, overrides_list
from gonogo.typed_config import apply_overrides, load_toml, resolve_preset, validate

DEFAULT_PRESET = "sft-tiny"
STAGE_METRICS = {"final_loss", "val_loss", "steps", "steps_completed", "tokens_per_second", "skipped_lines",
                 "good_lines", "train_seconds", "world_size", "parameters"}
BAD_LINES_FILE = "bad_lines.json"


class FinetuneStageSettings(StageSettings):
    config: str = DEFAULT_PRESET                  # a preset word or a TOML path (relative to the plan)
    # "@stage" (the model an earlier stage produced), a checkpoint, run or HF export directory;
    # default: the newest committed checkpoint of this run's `train` stages
    checkpoint: Optional[str] = None
    nproc: int = Field(default=2, ge=1)
    overrides: Union[dict[str, Any], list[str]] = Field(default_factory=dict)
    timeout_s: float = Field(default=1800.0, gt=0)
    resume: str = "auto"                          # "auto" | "never" | a checkpoint path


# -- the config ---------------------------------------------------------------------------------------

def checkpoint_model(checkpoint: Path) -> dict[str, Any]:
    """The model table of a checkpoint (gonogo meta.json, or an HF export read by gonogo.export)."""
    from gonogo.checkpoints import manifest

    meta_path = checkpoint / manifest.META_NAME
    if meta_path.is_file():
        return json.loads(meta_path.read_text(encoding="utf-8"))["model"]
    from gonogo.checkpoints.hf_import import check_hf_weights, hf_model_config

    model = hf_model_config(checkpoint).model_dump()  # config.json; the weights load in the workers,
    check_hf_weights(checkpoint)                        # but a truncated file is refused here, in one line
    return model


def checkpoint_tokenizer_dir(checkpoint: Path) -> Optional[str]:
    """The directory of the model's own tokenizer (a Hugging Face model, or a checkpoint trained
    with one); None for gonogo's byte tokenizer."""
    from gonogo.checkpoints import manifest
    from gonogo.checkpoints.hf_import import tokenizer_name

    meta_path = checkpoint / manifest.META_NAME
    if meta_path.is_file():
        return json.loads(meta_path.read_text(encoding="utf-8")).get("tokenizer_dir")
    return str(checkpoint.resolve()) if tokenizer_name(checkpoint) == "hf" else None


def load_finetune_config(preset: str | Path, checkpoint: str | Path,
                         overrides: list[str]) -> tuple[TrainConfig, Path, Path]:
    """-> (the validated config, its TOML path, the resolved checkpoint directory)."""
    from gonogo.checkpoints import resolve

    path = resolve_preset(preset)
    data = apply_overrides(load_toml(path), overrides)
    if "model" in data:
        raise UserError(f"{path}: a finetune config takes the model's shape from the checkpoint; "
                        f"remove the [model] table and model.* overrides")
    resolved = resolve(Path(checkpoint)).path
    data["model"] = checkpoint_model(resolved)
    data.setdefault("data", {}).setdefault("format", "chat")
    tokenizer_dir = checkpoint_tokenizer_dir(resolved)
    if tokenizer_dir is not None:
        data["data"].setdefault("tokenizer", tokenizer_dir)  # the model's own tokenizer and chat template
    data.setdefault("train", {})["init_from"] = str(resolved.resolve())
    return validate(TrainConfig, data, source=str(path)), path, resolved


def read_user_file(config: TrainConfig, stage_dir: Path) -> tuple[int, int]:
    """(good lines, skipped lines) of a chat JSONL source; the bad lines go to bad_lines.json.
    UserError when fewer than data.min_good_fraction of the lines are usable."""
    from gonogo.data.sft import read_sft_jsonl

    data = config.data
    if data.format != "chat" or data.source == "synthetic":
        return 0, 0
    result = read_sft_jsonl(data.source, data.min_good_fraction)
    if result.bad_lines:
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(stage_dir / BAD_LINES_FILE, [{"line": number, "problem": problem}
                                                       for number, problem in result.bad_lines])
    return len(result.examples), result.skipped


def default_checkpoint(run_dir: RunDir) -> Path:
    """The newest committed checkpoint of the run's ``train`` stages (from state.json)."""
    from gonogo.checkpoints.reference import newest_verified_across

    stages = run_dir.read_state().get("stages", {})
    names = [name for name, record in stages.items() if record.get("kind") == "train"]
    roots = [run_dir.checkpoints_dir / name for name in names if (run_dir.checkpoints_dir / name).is_dir()]
    choice, _skipped = newest_verified_across(roots)
    if choice is None:
        raise UserError(f"{run_dir.root}: no committed checkpoint of a `train` stage in this run; "
                        f"run a train stage first or set the finetune stage's `checkpoint`")
    return choice


def finetune(config: TrainConfig, config_path: Path, nproc: int, *, run_dir: RunDir, stage: str,
             stage_dir: Path, resume: str, timeout_s: float, run_command, on_update) -> Metrics:
    """Read the user's file (if any), then run the trainer's workers; the stage metrics."""
    good, skipped = read_user_file(config, stage_dir)
    metrics = train_stage.launch(config, config_path.name, nproc, run_dir=run_dir, stage=stage,
                                 stage_dir=stage_dir, resume=resume, timeout_s=timeout_s,
                                 run_command=run_command, on_update=on_update)
    metrics.update(skipped_lines=skipped, good_lines=good, init_from=config.train.init_from,
                   data_source=config.data.source)
    if config.data.format != "chat" or config.data.source == "synthetic":
        # no user file was read: its line counts are unknown, not "0 skipped"
        metrics.update(skipped_lines=None, good_lines=None)
        metrics.setdefault("unknown", {}).update(dict.fromkeys(
            ("skipped_lines", "good_lines"), f"no user file was read (data source {config.data.source!r})"))
    return metrics


# -- the stage ----------------------------------------------------------------------------------------

def run(ctx: StageContext, settings: FinetuneStageSettings) -> Metrics:
    preset = settings.config
    if preset.endswith(".toml") or "/" in preset:
        preset = str(ctx.resolve_path(preset))
    checkpoint = (Path(str(ctx.resolve_model(settings.checkpoint))) if settings.checkpoint
                  else default_checkpoint(ctx.run_dir))
    config, path, _resolved = load_finetune_config(preset, checkpoint, overrides_list(settings.overrides))
    if config.data.source not in ("synthetic", "stdlib"):
        source = ctx.resolve_path(config.data.source)
        config = config.model_copy(update={"data": config.data.model_copy(update={"source": str(source)})})
    resume = settings.resume
    if resume not in ("auto", "never"):
        resume = str(ctx.resolve_path(resume))
    metrics = finetune(config, path, settings.nproc, run_dir=ctx.run_dir, stage=ctx.name, stage_dir=ctx.stage_dir,
                       resume=resume, timeout_s=settings.timeout_s, run_command=ctx.run_command,
                       on_update=lambda update: ctx.progress(train_stage.progress_text(update)))
    produced = ctx.run_dir.checkpoints_dir / ctx.name
    if config.train.checkpoint and produced.is_dir():
        from gonogo.checkpoints import resolve

        ctx.record_output(resolve(produced).path)  # what `@<this stage>` means to later stages
    return metrics


def report(stage_dir: Path, metrics: Metrics) -> Optional[list[ReportItem]]:
    items = train_stage.report(stage_dir, metrics) or []
    bad = stage_dir / BAD_LINES_FILE
    if bad.is_file():
        rows = json.loads(bad.read_text(encoding="utf-8"))
        items.append(ReportItem(title=f"Skipped lines of the SFT file ({len(rows)})", table=rows[:50]))
    return items or None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gonogo.stage_cli import IntermixedParser

    parser.__class__ = IntermixedParser
    parser.add_argument("items", nargs="*", metavar="[CONFIG] key=value",
                        help=f"a finetune preset word or TOML file (default: {DEFAULT_PRESET}), then overrides "
                             f"such as train.steps=50 data.source=chats.jsonl")
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="the pretrained model: a checkpoint, run or Hugging Face export directory")
    parser.add_argument("--nproc", type=int, default=1, help="processes (ranks) on this machine (default: 1)")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: a new folder under runs/)")
    parser.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                        help="continue this finetune from its newest checkpoint in --out (auto), start fresh (never), "
                             "or from PATH")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before the run is stopped (default: 3600)")


def split_items(items: list[str]) -> tuple[str, list[str]]:
    """The optional preset word before the ``key=value`` overrides."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return DEFAULT_PRESET, items


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    if args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: must be at least 1")
    preset, overrides = split_items(args.items)
    return {"config": preset, "checkpoint": str(args.checkpoint), "nproc": args.nproc, "overrides": overrides,
            "timeout_s": args.timeout, "resume": args.resume}


def _config(settings: FinetuneStageSettings) -> TrainConfig:
    config, _path, _checkpoint = load_finetune_config(settings.config, Path(settings.checkpoint or "."),
                                                      overrides_list(settings.overrides))
    return config


def _check(args: argparse.Namespace, settings: FinetuneStageSettings) -> None:
    config = _config(settings)  # --out was checked before (gonogo.stage_cli), the model is read here
    if config.data.source not in ("synthetic", "stdlib"):
        source = str(Path(config.data.source).expanduser().resolve())
        config = config.model_copy(update={"data": config.data.model_copy(update={"source": source})})
    train_stage.preflight(config, settings.nproc, settings.resume)


def _continue_run(args: argparse.Namespace, settings: FinetuneStageSettings) -> Optional[RunDir]:
    if args.out is not None and (args.out / "stages").is_dir() and settings.resume != "never":
        return train_stage.continue_run_dir(args.out, "finetune", _config(settings).train.steps)
    return None


def _summary(args: argparse.Namespace, stage_dir: Path, metrics: Metrics) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"gonogo finetune {split_items(args.items)[0]}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(STAGE_METRICS):
        if key in metrics:
            value = metrics[key]
            table.add_row(key, f"{value:,.4g}" if isinstance(value, float) else str(value))
    Console().print(table)


STAGE = StageKind(
    name="finetune",
    description="supervised finetuning (SFT) from a pretrained checkpoint with the same trainer: chat data, "
                "loss on the assistant's tokens only; built-in reasoning chats or a user JSONL",
    settings=FinetuneStageSettings,
    metrics=lambda settings: STAGE_METRICS,
    run=run,
    report=report,
    devices=lambda settings: settings.nproc,
    command=StageCommand(
        add_arguments=add_arguments, settings=_settings, check=_check, continue_run=_continue_run, summary=_summary,
        resume_hint=lambda run_dir: (f"run the same command with --out {run_dir.root} "
                                     f"to continue from the newest checkpoint")),
)
