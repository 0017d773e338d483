"""The ``eval`` stage kind and the ``gonogo eval`` command: accuracy with test-time scaling.

    gonogo eval --checkpoint DIR [--samples 1,2,4,8,16] [--tasks add,sub,...] [--num N] [--seed S]
                [--sample-seeds S] [--temperature T] [--data FILE.jsonl] [--compare-to DIR] [--json F] [--out DIR]

Metrics: ``accuracy`` (greedy exact match of the final answer), ``answered`` (share of greedy
completions with a final answer), ``maj@K``, ``pass@K``, ``best_of_K`` (the process verifier's
pick, which never sees the reference), ``maj_gain@K`` and ``best_gain@K`` (minus greedy) for each
configured K, each with ``_ci_low`` / ``_ci_high`` (95% bootstrap over questions; sampled scores
are the mean over ``sample_seeds`` sampling seeds), ``verifier_precision`` / ``verifier_recall``
(of the verifier's acceptance against the labels, computed after scoring), ``verifier_lift``
(precision over the share of samples that are right),
``tokens_per_question``; with ``compare_to`` also ``compare_accuracy`` and ``accuracy_gain``
(this model's greedy accuracy minus the other's, on the same questions, with its interval).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

from pydantic import Field, field_validator

from gonogo.errors import UserError
from gonogo.rundir import write_json_atomic
from gonogo.stages.base import Metrics, ReportItem, StageCommand, StageContext, StageKind, StageSettings

RESULTS_FILE = "eval.json"
NOT_METRICS = ("per_family", "curve", "compare", "bad_lines", "per_seed")
SAMPLES_FILE = "samples.jsonl"


class EvalSettings(StageSettings):
    checkpoint: Optional[str] = None        # default: the run's newest committed checkpoint
    samples: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16])
    tasks: Optional[list[str]] = None       # synthetic families (default: all)
    num: int = Field(default=100, ge=1)     # held-out questions (or the first N of `data`)
    seed: int = 0
    temperature: float = Field(default=0.8, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)     # 0: no top-k filter
    max_tokens: int = Field(default=96, ge=1)
    data: Optional[str] = None              # a JSONL of {"prompt"|"messages", "answer"}
    min_good_fraction: float = Field(default=0.9, ge=0, le=1)
    prompt_format: str = "auto"             # "auto" (from the checkpoint), "chat" or "text"
    compare_to: Optional[str] = None        # "@stage" (that stage's model in this run) or a checkpoint directory
    timeout_s: float = Field(default=1200.0, gt=0)
    sample_seeds: int = Field(default=1, ge=1)   # sampling rounds (seeds) of max(samples) samples per question
    bootstrap: int = Field(default=1000, ge=100)  # bootstrap draws over questions for the confidence intervals
    device: str = "auto"                    # auto: the first GPU when there is one, else the CPU

    @field_validator("samples")
    @classmethod
    def _samples(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 for k in value):
            raise ValueError("samples must be a non-empty list of k >= 1, e.g. [1, 2, 4, 8]")
        return sorted(set(value))

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        from gonogo.data.synthetic import FAMILIES

        unknown = [name for name in value or [] if name not in FAMILIES]
        if unknown or value == []:
            raise ValueError(f"unknown task families {unknown}; choose from {', '.join(FAMILIES)}")
        return value

    @field_validator("prompt_format")
    @classmethod
    def _format(cls, value: str) -> str:
        if value not in ("auto", "chat", "text"):
            raise ValueError("prompt_format must be auto, chat or text")
        return value


def _with_ci(names: set[str]) -> set[str]:
    return names | {f"{name}_ci_{end}" for name in names for end in ("low", "high")}


def stage_metrics(settings: EvalSettings) -> set[str]:
    names = _with_ci({"accuracy"}) | {"tokens_per_question", "questions", "answered", "verifier_precision",
                                      "verifier_recall", "verifier_lift", "verifier_samples",
                                      "verifier_accepted"}
    for k in settings.samples:
        names |= _with_ci({f"maj@{k}", f"pass@{k}", f"best_of_{k}", f"maj_gain@{k}", f"best_gain@{k}"})
    if settings.compare_to:
        names |= {"compare_accuracy"} | _with_ci({"accuracy_gain"})
    return names


def run_evaluation(settings: EvalSettings, checkpoint: Path, compare_to: Optional[Path],
                   data: Optional[Path], out_dir: Path) -> dict[str, Any]:
    """Questions, generation and scores; writes eval.json and samples.jsonl into ``out_dir``."""
    from gonogo.eval.evaluate import Options, builtin_questions, evaluate, user_questions

    bad_lines: list = []
    if data is not None:
        questions, bad_lines = user_questions(data, settings.min_good_fraction, settings.num)
    else:
        questions = builtin_questions(settings.num, settings.seed, settings.tasks)
    options = Options(samples=settings.samples, temperature=settings.temperature, top_p=settings.top_p,
                      top_k=settings.top_k, sample_seeds=settings.sample_seeds, bootstrap=settings.bootstrap,
                      seed=settings.seed, max_tokens=settings.max_tokens, timeout_s=settings.timeout_s,
                      device=settings.device)
    summary = evaluate(checkpoint, questions, options, compare_to=compare_to, prompt_format=settings.prompt_format,
                       samples_path=out_dir / SAMPLES_FILE)
    summary["data"] = str(data) if data else "synthetic:heldout"
    summary["skipped_lines"] = len(bad_lines)
    summary["bad_lines"] = [{"line": number, "problem": problem} for number, problem in bad_lines[:50]]
    write_json_atomic(out_dir / RESULTS_FILE, summary)
    return summary


def _checkpoint_of(ctx: StageContext, name: str) -> Path:
    """``@stage`` (the model that stage of this run produced), a stage name, or a path."""
    from gonogo.checkpoints.reference import resolve_path

    if name.startswith("@"):
        return resolve_path(Path(str(ctx.resolve_model(name))))
    stage_checkpoints = ctx.run_dir.checkpoints_dir / name
    if "/" not in name and stage_checkpoints.is_dir():
        return resolve_path(stage_checkpoints)
    path = ctx.resolve_path(name)
    if not path.exists():
        raise UserError(f"stage {ctx.name!r}: {name!r} is neither a stage of this run with checkpoints "
                        f"nor a checkpoint directory")
    return resolve_path(path)


def run(ctx: StageContext, settings: EvalSettings) -> Metrics:
    from gonogo.checkpoints.reference import resolve_path

    checkpoint = _checkpoint_of(ctx, settings.checkpoint) if settings.checkpoint else resolve_path(ctx.run_dir.root)
    compare = _checkpoint_of(ctx, settings.compare_to) if settings.compare_to else None
    data = ctx.resolve_path(settings.data) if settings.data else None
    ctx.progress(f"evaluating {checkpoint.parent.name}/{checkpoint.name} on {settings.num} questions")
    summary = run_evaluation(settings, checkpoint, compare, data, ctx.stage_dir)
    return {key: value for key, value in summary.items() if key not in NOT_METRICS}


# -- the report ---------------------------------------------------------------------------------------

def report(stage_dir: Path, metrics: Metrics) -> Optional[list[ReportItem]]:
    path = stage_dir / RESULTS_FILE
    if not path.is_file():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    items = []
    if summary.get("curve"):
        items += _scaling_items(summary)
    k = max(summary.get("samples") or [1])
    compare = (summary.get("compare") or {}).get("per_family", {})
    rows = []
    for family, block in summary.get("per_family", {}).items():
        row = {"family": family, "questions": block["questions"], "accuracy": round(block["accuracy"], 4)}
        for name in (f"maj@{k}", f"pass@{k}", f"best_of_{k}"):
            if name in block:
                row[name] = round(block[name], 4)
        if family in compare:
            row["compared accuracy"] = round(compare[family], 4)
        rows.append(row)
    items.append(ReportItem(title="Per task family", table=rows))
    if summary.get("bad_lines"):
        items.append(ReportItem(title=f"Skipped lines of {summary.get('data')} ({summary.get('skipped_lines')})",
                                table=summary["bad_lines"]))
    return items


def _interval(summary: dict[str, Any], name: str) -> str:
    value, low, high = summary.get(name), summary.get(f"{name}_ci_low"), summary.get(f"{name}_ci_high")
    if value is None:
        return "not measured"
    def shown(number: float) -> str:
        return f"{round(number, 3) + 0.0:.3f}"  # + 0.0: no "-0.000" for a sum that is zero up to rounding

    if low is None or high is None:
        return shown(value)
    return f"{shown(value)} [{shown(low)}, {shown(high)}]"


def _gain_verdict(summary: dict[str, Any], name: str, label: str, k: int) -> str:
    """One plain sentence: does ``name@k`` (a gain over greedy) hold beyond the noise, seed by seed?"""
    low = summary.get(f"{name}@{k}_ci_low")
    seeds = summary.get("per_seed") or []
    wins = sum(1 for entry in seeds if (entry.get(f"{name}@{k}") or 0) > 0)
    held = ("holds: its 95% interval is above 0" if low is not None and low > 0
            else "does not hold beyond the noise: its 95% interval reaches 0 or below")
    return (f"{label} minus greedy: {_interval(summary, f'{name}@{k}')}; the gain {held}; it is positive at "
            f"{wins} of {len(seeds)} sampling seed{'s' if len(seeds) != 1 else ''}.")


def _scaling_items(summary: dict[str, Any]) -> list[ReportItem]:
    """The test-time scaling curve with its bootstrap bands, its table, the verifier's quality
    and the per-seed values."""
    from gonogo.plots import new_figure, to_png

    curve = summary["curve"]
    ks = [point["k"] for point in curve]
    seeds = summary.get("sample_seeds", 1)
    figure, axes = new_figure(6.5, 3.6)
    greedy, low, high = summary["accuracy"], summary.get("accuracy_ci_low"), summary.get("accuracy_ci_high")
    axes.plot(ks, [greedy] * len(ks), "k--", label="greedy")
    if low is not None and high is not None:
        axes.fill_between(ks, [low] * len(ks), [high] * len(ks), color="black", alpha=0.08)
    verifier_name = ", ".join(summary.get("verifier", []))
    for name, marker, label in (("maj@{k}", "o-", "maj@k"), ("pass@{k}", "s-", "pass@k"),
                                ("best_of_{k}", "^-", f"best-of-k ({verifier_name})")):
        values = [summary[name.format(k=k)] for k in ks]
        (line,) = axes.plot(ks, values, marker, label=label)
        lows = [summary.get(name.format(k=k) + "_ci_low") for k in ks]
        highs = [summary.get(name.format(k=k) + "_ci_high") for k in ks]
        if None not in lows and None not in highs:
            axes.fill_between(ks, lows, highs, color=line.get_color(), alpha=0.15)
    if summary.get("compare_accuracy") is not None:
        axes.plot(ks, [summary["compare_accuracy"]] * len(ks), ":", color="grey", label="compared model (greedy)")
    axes.set_xscale("log", base=2)
    axes.set_xticks(ks, [str(k) for k in ks])
    axes.set_xlabel(f"k (samples per question, temperature {summary.get('temperature')})")
    axes.set_ylabel("accuracy")
    axes.set_ylim(0, 1.02)
    axes.set_title(f"{summary['questions']} questions x {seeds} sampling seed{'s' if seeds != 1 else ''}; "
                   f"bands: 95% bootstrap over questions", fontsize="small")
    axes.legend(fontsize="small")
    items = [ReportItem(title="Test-time scaling: accuracy against k, with 95% confidence bands",
                        png=to_png(figure))]
    items.append(ReportItem(title="Test-time scaling (value [95% CI low, high])", table=[
        {"k": p["k"], "greedy": _interval(summary, "accuracy"), "maj@k": _interval(summary, f"maj@{p['k']}"),
         "best-of-k": _interval(summary, f"best_of_{p['k']}"), "pass@k": _interval(summary, f"pass@{p['k']}"),
         "maj gain": _interval(summary, f"maj_gain@{p['k']}"), "best-of gain": _interval(summary, f"best_gain@{p['k']}"),
         "tokens/question": round(p["tokens_per_question"], 1)} for p in curve]))

    def quality(name: str, block: dict[str, Any]) -> dict[str, Any]:
        def shown(value: Any) -> Any:
            return "not measured" if value is None else round(value, 4)
        return {"": name, "samples scored": block.get("verifier_samples"), "accepted": block.get("verifier_accepted"),
                "right (labelled after scoring)": block.get("verifier_right_samples"),
                "precision": shown(block.get("verifier_precision")), "recall": shown(block.get("verifier_recall")),
                "lift (precision / share right)": shown(block.get("verifier_lift"))}

    items.append(ReportItem(
        title=f"Best-of-N verifier ({verifier_name}): it never sees the reference answer. Precision = right "
              f"among accepted (every check passed), recall = accepted among right; right or wrong is "
              f"labelled after scoring",
        table=[quality("all", summary)] + [quality(family, block) for family, block in
                                           summary.get("per_family", {}).items()]))
    k = max(ks)
    items.insert(1, ReportItem(title="Does sampling beat greedy?", text=" ".join(
        _gain_verdict(summary, name, label, k) for name, label in (("maj_gain", f"maj@{k}"), ("best_gain", f"Best-of-{k} (verifier)")))))
    if len(summary.get("per_seed") or []) > 1:
        items.append(ReportItem(title=f"Each sampling seed alone (k = {k})", table=[
            {"sampling seed": entry["sampling_seed"], "greedy": round(summary["accuracy"], 4),
             f"maj@{k}": round(entry[f"maj@{k}"], 4), f"maj_gain@{k}": round(entry[f"maj_gain@{k}"], 4),
             f"best_of_{k}": round(entry[f"best_of_{k}"], 4), f"best_gain@{k}": round(entry[f"best_gain@{k}"], 4),
             f"pass@{k}": round(entry[f"pass@{k}"], 4)}
            for entry in summary["per_seed"]]))
    return items


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers separated by commas, e.g. 1,2,4,8") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a checkpoint, run or Hugging Face export directory")
    parser.add_argument("--samples", type=_int_list, default=[1, 2, 4, 8, 16], metavar="K,..",
                        help="the k of maj@k, pass@k and best-of-k (default: 1,2,4,8,16)")
    parser.add_argument("--tasks", default=None, metavar="FAMILY,..",
                        help="synthetic task families (default: all: add, sub, mul, count, reverse)")
    parser.add_argument("--num", type=int, default=100, help="questions (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="question and sampling seed (default: 0)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default: 0.8)")
    parser.add_argument("--sample-seeds", type=int, default=1, metavar="S",
                        help="sampling rounds of max(samples) samples per question, each its own seed (default: 1)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this much probability mass (default: 1.0)")
    parser.add_argument("--data", type=Path, default=None,
                        help='a JSONL file of {"prompt" or "messages", "answer"} instead of the built-in tasks')
    parser.add_argument("--compare-to", type=Path, default=None,
                        help="another checkpoint: its greedy accuracy and the gain over it")
    parser.add_argument("--device", default="auto",
                        help="auto (the first GPU when there is one, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: a new folder under runs/)")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    data: dict[str, Any] = {"checkpoint": str(args.checkpoint), "samples": args.samples, "num": args.num,
                            "seed": args.seed, "temperature": args.temperature, "top_p": args.top_p,
                            "sample_seeds": args.sample_seeds, "device": args.device,
                            "tasks": args.tasks.split(",") if args.tasks else None}
    if args.data is not None:
        data["data"] = str(args.data)
    if args.compare_to is not None:
        data["compare_to"] = str(args.compare_to)
    return data


def _check(args: argparse.Namespace, settings: EvalSettings) -> None:
    """Everything the user gave, before the run directory exists: a damaged model leaves nothing."""
    from gonogo.files import check_output_file
    from gonogo.checkpoints import check_readable
    from gonogo.checkpoints.reference import resolve_path

    checkpoint = resolve_path(args.checkpoint)
    compare = resolve_path(args.compare_to) if args.compare_to else None
    if args.data is not None and not args.data.is_file():
        raise UserError(f"--data {args.data}: no such file (give a JSONL file of {{\"prompt\", \"answer\"}} lines)")
    if args.json:
        check_output_file(args.json, "--json")  # before the evaluation, not after it
    for model in (checkpoint, compare):
        if model is not None:
            check_readable(model)


def _summary(args: argparse.Namespace, stage_dir: Path, metrics: Metrics) -> None:
    from rich.console import Console
    from rich.table import Table

    summary = json.loads((stage_dir / RESULTS_FILE).read_text(encoding="utf-8"))
    if args.json:
        write_json_atomic(args.json, summary)
    checkpoint, compare = summary.get("checkpoint", args.checkpoint), args.compare_to
    table = Table(title=f"gonogo eval {checkpoint}  ({summary['questions']} questions, "
                        f"temperature {args.temperature}, seed {args.seed})")
    for column in ("k", "greedy", "maj@k", "pass@k", "best-of-k", "tokens/question"):
        table.add_column(column, justify="right")
    for point in summary["curve"]:
        k = point["k"]
        table.add_row(str(k), _interval(summary, "accuracy"), _interval(summary, f"maj@{k}"),
                      _interval(summary, f"pass@{k}"), _interval(summary, f"best_of_{k}"),
                      f"{point['tokens_per_question']:.0f}")
    out = Console()
    out.print(table)
    k = max(point["k"] for point in summary["curve"])
    families = Table(title="per task family")
    for column in ("family", "questions", "accuracy", f"maj@{k}", f"pass@{k}", f"best_of_{k}"):
        families.add_column(column, justify="right")
    for name, block in summary["per_family"].items():
        families.add_row(name, str(block["questions"]), f"{block['accuracy']:.3f}", f"{block[f'maj@{k}']:.3f}",
                         f"{block[f'pass@{k}']:.3f}", f"{block[f'best_of_{k}']:.3f}")
    out.print(families)
    if "accuracy_gain" in summary:
        out.print(f"compared with {compare}: accuracy {summary['compare_accuracy']:.3f} -> {summary['accuracy']:.3f} "
                  f"(gain {_interval(summary, 'accuracy_gain')})")
    if summary["skipped_lines"]:
        out.print(f"skipped {summary['skipped_lines']} bad lines of {args.data} (see {stage_dir / RESULTS_FILE})")
    precision, recall = summary.get("verifier_precision"), summary.get("verifier_recall")
    out.print(f"best-of-k verifier ({', '.join(summary['verifier'])}; it never sees the reference): precision "
              f"{'not measured' if precision is None else f'{precision:.3f}'}, recall "
              f"{'not measured' if recall is None else f'{recall:.3f}'} over {summary['verifier_samples']} samples "
              f"(95% bootstrap intervals over questions in brackets, {summary['sample_seeds']} sampling seed(s))")
    out.print(f"generated {summary['generated_tokens']} tokens "
              f"in {summary['generation_seconds']:.1f} s")


STAGE = StageKind(
    name="eval",
    description="reasoning eval on held-out tasks with test-time scaling: greedy accuracy, maj@k, pass@k, "
                "best-of-N with a process verifier that never sees the reference, bootstrap confidence "
                "intervals, tokens per question, per task family",
    settings=EvalSettings,
    metrics=stage_metrics,
    run=run,
    report=report,
    command=StageCommand(add_arguments=add_arguments, settings=_settings, check=_check, summary=_summary),
)
