"""``gonogo collectives`` and the ``collectives`` stage: an nccl-tests-style benchmark via torch.distributed.

The work happens in ``gonogo.cluster.collectives_worker``, started on N processes by the real
torchrun (NCCL on GPUs, gloo on CPUs). This module validates the settings, runs torchrun as a
bounded child process group, streams rank 0's table (as the stage's progress, and into
``collectives.log``), adds the fabric-health lines (``gonogo.cluster.fabric``) and turns the rows
into the stage's metrics and report. It also owns the table's text layout through
``gonogo.cluster.collectives_table``, the same as nccl-tests' (src/util.cu), so that nccl-tests
parsers read it. ``gonogo collectives`` runs the stage through the plan runner (gate
``wrong_total == 0`` while results are checked) and prints that table on stdout once it ran.

Out-of-place and in-place forms (decided per op from what torch offers; docs/collectives.md):
  all_reduce, broadcast     in-place only (torch has no separate output tensor): out-of-place N/A
  all_gather                both; in place this rank's input is its own slice of the output
  reduce_scatter            both; in place this rank's output is its own slice of the input
  all_to_all, sendrecv      out-of-place only (torch has no in-place form): in-place N/A
A form printed as N/A is left out of the average bus bandwidth.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

from pydantic import Field, field_validator, model_validator

from gonogo.cluster.collectives_table import (DTYPE_NAMES, OP_NAMES, OpName, collective_timeout_s,
                                              is_table_line, parse_size)
from gonogo.errors import StageFailed, UserError
from gonogo.files import check_output_file
from gonogo.rundir import write_json_atomic
from gonogo.stages.base import ReportItem, StageCommand, StageContext, StageKind, StageSettings

log = logging.getLogger(__name__)


# -- settings and the run ---------------------------------------------------------------------
class CollectivesSettings(StageSettings):
    nproc: int = Field(2, ge=1, description="processes; 1 (one GPU) checks NCCL's results but moves no bytes between ranks")
    min_bytes: int = Field(1024, description="smallest size (bytes, or a string with K/M/G)")
    max_bytes: int = Field(16 * 1024 ** 2, description="largest size")
    factor: int = Field(4, ge=2, description="each size is the previous one times this")
    ops: list[OpName] = Field(default_factory=lambda: list(OP_NAMES), min_length=1)
    iters: int = Field(20, ge=1)
    warmup: int = Field(5, ge=0)
    check: int = Field(1, ge=0, description="checked repetitions per row and form")
    dtypes: list[Literal["float32", "bfloat16"]] = Field(default_factory=lambda: ["float32"], min_length=1)  # type: ignore[arg-type]
    timeout_s: float = Field(300.0, gt=0)

    @field_validator("min_bytes", "max_bytes", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_size(value)

    @field_validator("ops", "dtypes")
    @classmethod
    def _unique(cls, values: list[str]) -> list[str]:
        return list(dict.fromkeys(values))

    @model_validator(mode="after")
    def _range(self) -> "CollectivesSettings":
        if self.min_bytes > self.max_bytes:
            raise ValueError(f"min_bytes ({self.min_bytes}) is bigger than max_bytes ({self.max_bytes})")
        if self.nproc == 1 and "sendrecv" in self.ops:
            raise ValueError("sendrecv is a ring between ranks and needs nproc >= 2; with one process "
                             "leave it out of ops (e.g. --ops all_reduce,all_gather,reduce_scatter,broadcast)")
        return self


def _failure_reason(log_text: str, errors: list[str], code: int) -> str:
    """One line on why the run failed: the rank torchrun saw fail first, and what a rank reported.

    A rank that reports an error (``# error: rank R: ...``) is usually the one that noticed a
    peer hang or die; torchrun's "Root Cause" names the rank that ended first.
    """
    match = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", log_text, re.DOTALL)
    if not match:
        return errors[0] if errors else f"torchrun exited with code {code}"
    rank, exit_code = match.group(1), int(match.group(2))
    reported = [error for error in errors if error.startswith(f"rank {rank}:")]
    if reported:
        return reported[0]
    how = f"was killed by signal {-exit_code}" if exit_code < 0 else f"exited with code {exit_code}"
    return f"rank {rank} {how}" + (f"; {errors[0]}" if errors else "")


def run_collectives(settings: CollectivesSettings, work_dir: Path,
                    on_line: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Run the benchmark under torchrun; return the rows, summary and fabric report.

    Writes ``collectives.log`` (the table), ``collectives.json`` and ``torchrun.log`` (every
    line of every process) into ``work_dir``. Raises StageFailed if a rank dies or hangs.
    """
    from gonogo.cluster import fabric
    from gonogo.cluster.torchrun import torchrun_command, torchrun_env
    from gonogo.procs import ProcessTimeout, run_process

    work_dir.mkdir(parents=True, exist_ok=True)
    table_path, torchrun_log = work_dir / "collectives.log", work_dir / "torchrun.log"
    worker_results = work_dir / "worker-results.json"
    worker_args = [
        f"--min-bytes={settings.min_bytes}", f"--max-bytes={settings.max_bytes}", f"--factor={settings.factor}",
        f"--ops={','.join(settings.ops)}", f"--dtypes={','.join(settings.dtypes)}",
        f"--iters={settings.iters}", f"--warmup={settings.warmup}", f"--check={settings.check}",
        f"--collective-timeout={collective_timeout_s(settings.timeout_s)}", f"--results={worker_results}",
    ]
    argv = torchrun_command("gonogo.cluster.collectives_worker", worker_args, settings.nproc)
    errors: list[str] = []
    with table_path.open("w", encoding="utf-8") as table_file:
        def take(line: str) -> None:
            if not is_table_line(line):
                return  # torchrun's and the library's own chatter stays in torchrun.log
            if line.startswith("# error:"):
                errors.append(line[len("# error:"):].strip())
            table_file.write(line + "\n")
            table_file.flush()
            on_line(line)

        before = fabric.snapshot()
        log.info("running %s", " ".join(argv))
        try:
            code = run_process(argv, timeout=settings.timeout_s, log_path=torchrun_log, env=torchrun_env(), on_line=take)
        except ProcessTimeout:
            reason = f" ({errors[0]})" if errors else ""
            raise StageFailed(f"collectives did not finish within {settings.timeout_s:g} s and were stopped "
                              f"(a hung or dead rank?){reason}; see {torchrun_log}") from None
        after = fabric.snapshot()
        if code != 0:
            reason = _failure_reason(torchrun_log.read_text(errors="replace"), errors, code)
            raise StageFailed(f"collectives failed: {reason}; see {torchrun_log}")
        fabric_report = fabric.compare(before, after)
        for line in fabric.describe(fabric_report):
            table_file.write(line + "\n")
            on_line(line)
    results = json.loads(worker_results.read_text(encoding="utf-8"))
    worker_results.unlink()
    results["fabric"] = fabric_report
    write_json_atomic(work_dir / "collectives.json", results)
    return results


def best_busbw(row: dict[str, Any]) -> float:
    return max((form["bus_bw"] for form in (row["out_of_place"], row["in_place"]) if form), default=0.0)


def loopback_probe(size: int, seconds: float = 0.3) -> dict[str, Any]:
    """One TCP stream over 127.0.0.1 in ``size``-byte messages: what the host's own loopback
    moves, the raw ceiling for gloo between processes on one machine (bounded by ``seconds``).

    The bus bandwidth of a collective is judged against this figure taken in the same run on
    the same machine, so a gate on it means something on a laptop and on a busy node alike.
    """
    import os
    import socket
    import threading
    import time

    payload = os.urandom(size)
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(10.0)
        port = server.getsockname()[1]

        def send() -> None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10.0) as sender:
                    deadline = time.monotonic() + seconds + 10.0
                    while time.monotonic() < deadline:
                        sender.sendall(payload)
            except OSError:
                pass  # the receiver closed its end: the probe is over

        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        connection, _ = server.accept()
        buffer = bytearray(min(size, 1 << 20) or 1)
        total = 0
        with connection:
            started = time.perf_counter()
            while time.perf_counter() - started < seconds:
                received = connection.recv_into(buffer)
                if not received:
                    break
                total += received
            elapsed = time.perf_counter() - started
        thread.join(timeout=15.0)
    return {"bytes": total, "seconds": elapsed, "message_bytes": size,
            "GBps": total / elapsed / 1e9 if total and elapsed > 0 else None}


def stage_metrics(results: dict[str, Any], ops: Sequence[str]) -> dict[str, Any]:
    rows = results["results"]
    tcp = results["fabric"]["tcp"]
    metrics: dict[str, Any] = {
        "busbw_GBps_avg": results["average_bus_bandwidth"]["bandwidth"],
        "wrong_total": results["wrong_total"],
        "tcp_retransmit_pct": tcp["retransmit_pct"] if tcp else None,
    }
    unknown: dict[str, str] = {}
    if metrics["wrong_total"] is None:
        unknown["wrong_total"] = "the correctness check was turned off (check = 0): nothing was checked"
    if tcp is None:
        unknown["tcp_retransmit_pct"] = "TCP counters not readable (/proc/net/snmp)"
    elif metrics["tcp_retransmit_pct"] is None:
        unknown["tcp_retransmit_pct"] = "no TCP segment was sent during the run"
    for op in ops:
        op_rows = [row for row in rows if row["op"] == op]
        largest = max(row["size"] for row in op_rows)
        metrics[f"{op}_busbw_GBps"] = max(best_busbw(row) for row in op_rows if row["size"] == largest)
    loopback = (results.get("loopback") or {}).get("GBps")
    metrics["loopback_GBps"] = loopback
    if "all_reduce" in ops and loopback:
        metrics["busbw_vs_loopback"] = metrics["all_reduce_busbw_GBps"] / loopback
    else:
        metrics["busbw_vs_loopback"] = None
        unknown["busbw_vs_loopback"] = ("all_reduce is not among the ops" if "all_reduce" not in ops
                                        else "the loopback probe moved no data")
    if unknown:
        metrics["unknown"] = unknown
    return metrics


# -- the stage --------------------------------------------------------------------------------
def run(ctx: StageContext, settings: CollectivesSettings) -> dict[str, Any]:
    # the reference first, while nothing else of this stage runs: the host's TCP loopback at
    # the largest message size (capped: beyond 64 MB a stream's rate no longer changes)
    ctx.progress("loopback probe")
    loopback = loopback_probe(min(settings.max_bytes, 64 * 1024 ** 2))
    results = run_collectives(settings, ctx.stage_dir, on_line=ctx.progress)
    results["loopback"] = loopback
    write_json_atomic(ctx.stage_dir / "collectives.json", results)
    for step, row in enumerate(results["results"]):
        wrongs = [form["nwrong"] for form in (row["out_of_place"], row["in_place"]) if form and form["nwrong"] is not None]
        ctx.event(rank=0, step=step, op=row["op"], type=row["type"], size_bytes=row["size"],
                  busbw_GBps=best_busbw(row), wrong=sum(wrongs) if wrongs else None)
    return stage_metrics(results, settings.ops)


def report(stage_dir: Path, metrics: dict[str, Any]) -> Optional[list[ReportItem]]:
    path = stage_dir / "collectives.json"
    if not path.is_file():
        return None
    from gonogo.cluster import fabric
    from gonogo.plots import new_figure, to_png

    results = json.loads(path.read_text(encoding="utf-8"))
    rows = results["results"]
    figure, axes = new_figure(7, 4.2)
    for op, type_name in dict.fromkeys((row["op"], row["type"]) for row in rows):
        series = [row for row in rows if row["op"] == op and row["type"] == type_name]
        axes.plot([row["size"] for row in series], [best_busbw(row) for row in series], marker="o",
                  label=op if len({row["type"] for row in rows}) == 1 else f"{op} ({type_name})")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("size (bytes)")
    axes.set_ylabel("bus bandwidth (GB/s, best of in/out-of-place)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    png = to_png(figure, dpi=110)

    def cell(form: Optional[dict[str, Any]], key: str) -> Any:
        return None if form is None else (round(form[key], 3) if isinstance(form[key], float) else form[key])

    table = [{"op": row["op"], "type": row["type"], "size (B)": row["size"], "count": row["count"],
              "out-of-place time (us)": cell(row["out_of_place"], "time"),
              "out-of-place busbw (GB/s)": cell(row["out_of_place"], "bus_bw"),
              "out-of-place #wrong": cell(row["out_of_place"], "nwrong"),
              "in-place time (us)": cell(row["in_place"], "time"),
              "in-place busbw (GB/s)": cell(row["in_place"], "bus_bw"),
              "in-place #wrong": cell(row["in_place"], "nwrong")} for row in rows]
    config = results["config"]
    summary = (f"{config['nranks']} ranks, {config['backend']} on {config['device']}; "
               f"average bus bandwidth {results['average_bus_bandwidth']['bandwidth']:.3g} GB/s; "
               + ("correctness not checked (check = 0). " if results["wrong_total"] is None
                  else f"{results['wrong_total']} wrong elements. ")
               + (f"TCP loopback reference {results['loopback']['GBps']:.3g} GB/s "
                  f"({results['loopback']['message_bytes']} B messages). "
                  if (results.get("loopback") or {}).get("GBps") else "")
               + " ".join(re.sub(r"\s+:", ":", line.lstrip("# ")) + "." for line in fabric.describe(results["fabric"])[1:]))
    return [ReportItem(title="Bus bandwidth by size", png=png),
            ReportItem(title="Collectives", text=summary),
            ReportItem(title="Every row", table=table)]


# -- the command: the stage through the plan runner (gonogo.stage_cli) --------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = CollectivesSettings()
    parser.add_argument("--nproc", help="processes, one per GPU (default: every GPU, else 2)")
    parser.add_argument("-b", "--minbytes", default="1K", help="smallest size, K/M/G = powers of 1024 (default 1K)")
    parser.add_argument("-e", "--maxbytes", default="16M", help="largest size (default 16M)")
    parser.add_argument("-f", "--stepfactor", default=str(defaults.factor), help="size multiplier (default 4)")
    parser.add_argument("--ops", default=",".join(OP_NAMES), help=f"comma-separated, of: {', '.join(OP_NAMES)}")
    parser.add_argument("-n", "--iters", default=str(defaults.iters), help="timed iterations (default 20)")
    parser.add_argument("-w", "--warmup", default=str(defaults.warmup), help="untimed iterations first (default 5)")
    parser.add_argument("-c", "--check", default=str(defaults.check), help="checked iterations (default 1; 0 = none)")
    parser.add_argument("-d", "--datatype", default="float32", help="float32, bfloat16 or all")
    parser.add_argument("-J", "--json", type=Path, help="write every row and the summary to this JSON file")
    parser.add_argument("-T", "--timeout", default=str(defaults.timeout_s), help="seconds before the run is stopped (default 300)")
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory (default: a new folder under runs/); the table, JSON and torchrun "
                             "log are in its stages/collectives/")


def _number(flag: str, text: str, kind: type, minimum: float) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise UserError(f"{flag} {text!r}: not a{'n integer' if kind is int else ' number'}") from None
    if value < minimum:
        raise UserError(f"{flag} {text!r}: must be at least {minimum:g}")
    return value


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    sizes = {}
    for flag, text in (("-b", args.minbytes), ("-e", args.maxbytes)):
        try:
            sizes[flag] = parse_size(text)
        except ValueError as error:
            raise UserError(f"{flag} {error}") from None
    if sizes["-b"] > sizes["-e"]:
        raise UserError(f"-b {args.minbytes} is bigger than -e {args.maxbytes}; the smallest size must come first")
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = [op for op in ops if op not in OP_NAMES]
    if unknown or not ops:
        raise UserError(f"--ops: unknown op {(unknown or [args.ops])[0]!r}; choose from {', '.join(OP_NAMES)}")
    dtypes = list(DTYPE_NAMES) if args.datatype == "all" else [name.strip() for name in args.datatype.split(",")]
    if any(name not in DTYPE_NAMES for name in dtypes):
        raise UserError(f"-d {args.datatype!r}: choose float32, bfloat16 or all")
    if args.nproc is None:
        import torch
        nproc = max(2, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    else:
        nproc = _number("--nproc", args.nproc, int, 1)
    return dict(
        nproc=nproc, min_bytes=sizes["-b"], max_bytes=sizes["-e"],
        factor=_number("-f", args.stepfactor, int, 2), ops=ops, dtypes=dtypes,
        iters=_number("--iters", args.iters, int, 1), warmup=_number("--warmup", args.warmup, int, 0),
        check=_number("--check", args.check, int, 0), timeout_s=_number("--timeout", args.timeout, float, 1))


def _check(args: argparse.Namespace, settings: CollectivesSettings) -> None:
    if args.json:
        check_output_file(args.json, "--json")


def default_gates(settings: CollectivesSettings) -> list[str]:
    """What the command's exit code says: no wrong element. With ``check = 0`` nothing is checked
    (``wrong_total`` unknown): no gate, and the command says so instead of passing a check."""
    return ["wrong_total == 0"] if settings.check > 0 else []


def _summary(args: argparse.Namespace, stage_dir: Path, metrics: dict[str, Any]) -> None:
    """The table (nccl-tests' layout, with the fabric lines) on stdout, as the stage wrote it: up
    to the failure where a rank died or hung (then there are no results to write or count)."""
    table = stage_dir / "collectives.log"
    if table.is_file():
        sys.stdout.write(table.read_text(encoding="utf-8"))
        sys.stdout.flush()
    path = stage_dir / "collectives.json"
    if not path.is_file():
        return
    results = json.loads(path.read_text(encoding="utf-8"))
    if args.json:
        write_json_atomic(args.json, results)
    if results["wrong_total"] is None:
        print("gonogo collectives: correctness not checked (--check 0)", file=sys.stderr)
    elif results["wrong_total"]:
        print(f"gonogo collectives: {results['wrong_total']} wrong elements in "
              f"{results['out_of_bounds']['count']} rows", file=sys.stderr)


STAGE = StageKind(
    name="collectives",
    description="nccl-tests-style bandwidth and correctness of each collective (torchrun, NCCL or gloo)",
    settings=CollectivesSettings,
    metrics=lambda settings: {"busbw_GBps_avg", "wrong_total", "tcp_retransmit_pct", "loopback_GBps",
                              "busbw_vs_loopback", *(f"{op}_busbw_GBps" for op in settings.ops)},
    run=run,
    report=report,
    devices=lambda settings: settings.nproc,
    default_gates=default_gates,
    command=StageCommand(add_arguments=add_arguments, settings=_settings, check=_check, summary=_summary),
)
