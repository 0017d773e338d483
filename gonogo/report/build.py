"""Builds summary.json and report.html from a run directory alone (``gonogo report RUN_DIR``)."""

from __future__ import annotations

import argparse
import base64
import logging
from pathlib import Path
from typing import Any

from gonogo.gates import format_value
from gonogo.plan import load_plan
from gonogo.report.summary import EXIT_CODES, summarize
from gonogo.rundir import RunDir, write_json_atomic

log = logging.getLogger(__name__)
TEMPLATES = Path(__file__).parent / "templates"


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, (bool, int, float)):
        text = format_value(value)
        return text
    return str(value)


def _fmt_seconds(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def _sections(plan: Any, run_dir: RunDir, summary: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    sections: dict[str, list[dict[str, Any]]] = {}
    for stage, entry in zip(plan.stages, summary["stages"]):
        if stage.kind.report is None or entry["status"] in ("skipped", "not run"):
            continue
        stage_dir = run_dir.stage_dir(stage.name, create=False)
        if not stage_dir.is_dir():
            continue
        try:
            items = stage.kind.report(stage_dir, entry["metrics"]) or []
        except Exception as error:  # a broken plot must not cost the whole report
            log.exception("report section of stage %s failed", stage.name)
            items = []
            sections.setdefault(stage.name, []).append(
                {"title": "report section unavailable", "text": f"{type(error).__name__}: {error}"})
        for item in items:
            sections.setdefault(stage.name, []).append({
                "title": item.title,
                "png_b64": base64.b64encode(item.png).decode("ascii") if item.png else None,
                "table": item.table, "text": item.text,
            })
    return sections


def _files(run_dir: RunDir, summary: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    files = {}
    for entry in summary["stages"]:
        stage_dir = run_dir.stage_dir(entry["name"], create=False)
        if stage_dir.is_dir():
            files[entry["name"]] = [{"name": str(p.relative_to(stage_dir)), "size": p.stat().st_size}
                                    for p in sorted(stage_dir.rglob("*")) if p.is_file()][:200]
    return files


def build_report(run_dir: RunDir) -> dict[str, Any]:
    """Write summary.json and report.html; return the summary."""
    import jinja2

    plan = load_plan(run_dir.plan_path)
    summary = summarize(plan, run_dir)
    write_json_atomic(run_dir.summary_path, summary)
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True, undefined=jinja2.ChainableUndefined)
    from gonogo.train.triage import bundles

    # the page opens with what hung (a triage bundle of any stage), before the verdict and the stages
    what_hung = [{"line": bundle["what_hung"], "folder": bundle["folder"]} for bundle in bundles(run_dir.root)]
    html = environment.get_template("report.html.j2").render(
        s=summary, sections=_sections(plan, run_dir, summary), files=_files(run_dir, summary),
        fmt=_fmt, fmt_seconds=_fmt_seconds, what_hung=what_hung)
    from gonogo.files import write_atomic

    write_atomic(run_dir.report_path, html)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory (runs/<plan>-<time>)")


def command(args: argparse.Namespace) -> int:
    from rich.console import Console

    run_dir = RunDir.open(args.run_dir)
    summary = build_report(run_dir)
    Console().print(f"[bold]{summary['verdict']}[/bold]  report: {run_dir.report_path}  summary: {run_dir.summary_path}")
    return EXIT_CODES.get(summary["verdict"], 1)
