"""``gonogo run``: parse the flags, run the plan with a live view, print the verdict."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.live import Live
from rich.table import Table

from gonogo.plan import Stage, parse_parameters
from gonogo.runner import Outcome, cli_run

STATUS_STYLE = {"passed": "green", "failed": "red", "error": "red", "interrupted": "yellow",
                "running": "cyan", "skipped": "dim", "not run": "dim", "waiting": "dim"}


def _names(text: Optional[str]) -> Optional[set[str]]:
    if text is None:
        return None
    return {name.strip() for name in text.split(",") if name.strip()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", nargs="?", help="a plan: a built-in name (laptop, quick, ...) or a TOML path (default: laptop)")
    parser.add_argument("parameters", nargs="*", metavar="NAME=VALUE",
                        help="the plan's parameters, e.g. gonogo run byo-model model=DIR data=FILE")
    parser.add_argument("--out", type=Path, help="the run directory (default: a new folder under runs/)")
    parser.add_argument("--only", help="run only these stages (comma-separated names)")
    parser.add_argument("--skip", help="skip these stages (comma-separated names)")
    parser.add_argument("--resume", action="store_true",
                        help="continue a stopped or failed run (the one in --out, else the newest of this plan), skipping stages that passed")


class LiveView:
    """A table of stages with their status, progress and verdict as they come."""

    def __init__(self, console: Console):
        self.console = console
        self.rows: dict[str, dict[str, Any]] = {}
        self.live: Optional[Live] = None

    def __enter__(self) -> "LiveView":
        if self.console.is_terminal:
            self.live = Live(self._table(), console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.update(self._table())
            self.live.__exit__(*exc)

    def _table(self) -> Table:
        table = Table(title="gonogo", expand=False)
        for column in ("stage", "kind", "status", "time", "progress / result"):
            table.add_column(column)
        for name, row in self.rows.items():
            status = row["status"]
            elapsed = row.get("seconds") or (time.monotonic() - row["started"] if row.get("started") else None)
            table.add_row(name, row["kind"], f"[{STATUS_STYLE.get(status, '')}]{status}[/]",
                          "" if elapsed is None else f"{elapsed:.0f} s", row.get("text", ""))
        return table

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._table())

    def stage_started(self, stage: Stage, index: int, total: int) -> None:
        self.rows[stage.name] = {"kind": stage.kind.name, "status": "running", "started": time.monotonic(), "text": ""}
        if self.live is None:
            self.console.print(f"[{index + 1}/{total}] {stage.name} ({stage.kind.name}) ...")
        self._refresh()

    def stage_progress(self, stage: Stage, text: str) -> None:
        row = self.rows.get(stage.name)
        if row is not None:
            row["text"] = text[:90]
            self._refresh()

    def stage_finished(self, stage: Stage, record: dict[str, Any]) -> None:
        row = self.rows.setdefault(stage.name, {"kind": stage.kind.name})
        row.update(status=record["status"], seconds=record.get("wall_seconds"))
        gates = record.get("gates", [])
        passed = sum(1 for g in gates if g["passed"])
        row["text"] = (f"gates {passed}/{len(gates)} passed" if gates else "no gates") + (
            f" — {record['reason'][:70]}" if record.get("reason") else "")
        if self.live is None:
            style = STATUS_STYLE.get(record["status"], "")
            self.console.print(f"    [{style}]{record['status']}[/] in {record.get('wall_seconds', 0):.1f} s; {row['text']}")
        self._refresh()


def command(args: argparse.Namespace) -> int:
    console = Console()
    with LiveView(console) as view:
        outcome = cli_run(args.plan, args.out, _names(args.only), _names(args.skip), args.resume, observer=view,
                          parameters=parse_parameters(args.parameters))
    print_outcome(console, outcome)
    return outcome.exit_code


def print_outcome(console: Console, outcome: Outcome) -> None:
    """The verdict, its reasons and where the report is (``gonogo run`` and ``gonogo <kind>``)."""
    style = {"GO": "bold green", "NO-GO": "bold red", "ERROR": "bold red"}.get(outcome.verdict, "bold yellow")
    console.print(f"[{style}]{outcome.verdict}[/]  plan {outcome.summary['plan']['name']!r}")
    for reason in outcome.reasons:
        console.print(f"  - {reason}", markup=False)
    console.print(f"report:  {outcome.run_dir.report_path}\nsummary: {outcome.run_dir.summary_path}", markup=False)
