"""The nccl-tests table of ``gonogo collectives``: op names, sizes, and the text layout of its
header, rows and footer (the same as nccl-tests' src/util.cu, so that nccl-tests parsers read it),
and parsing it back. Shared by the stage (gonogo.stages.collectives.stage) and every rank's worker
(gonogo.cluster.collectives_worker).
"""

from __future__ import annotations

import re
import statistics
import typing
from typing import Any, Literal, Optional


OpName = Literal["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "sendrecv"]
OP_NAMES: tuple[OpName, ...] = typing.get_args(OpName)
DTYPE_NAMES = ("float32", "bfloat16")
NCCL_TYPE_NAMES = {"float32": "float", "bfloat16": "bfloat16"}  # the names nccl-tests prints
SIZE_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}  # binary, as nccl-tests
PROGRAM = "gonogo collectives"


def parse_size(text: Any) -> int:
    """Bytes from ``1024``, ``64K``, ``16M``, ``1G`` (powers of 1024, as nccl-tests' -b/-e)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGkmg]?)\s*", str(text))
        if not match:
            raise ValueError(f"{text!r} is not a size; give bytes with an optional K, M or G suffix, e.g. 64K")
        value = int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])
    if value < 1:
        raise ValueError(f"{text!r} is not a positive size")
    return value


def collective_timeout_s(timeout_s: float) -> float:
    """How long one collective may wait for the other ranks: a fifth of the run's limit, 5..60 s,
    so that the survivors name a hung rank well before the whole run is stopped."""
    return min(60.0, max(5.0, timeout_s / 5))


# -- the nccl-tests table ---------------------------------------------------------------------
def _fixed(value: float, width: int) -> str:
    """A number in ``width`` characters: 2 decimals if they fit, then fewer, then exponent."""
    for form in ("%*.2f", "%*.1f", "%*.0f"):
        text = form % (width, value)
        if len(text) <= width:
            return text
    return ("%*.1e" if width >= 7 else "%*.0e") % (width, value)


def header_lines(config: dict[str, Any], devices: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"# {PROGRAM}: nccl-tests layout via torch.distributed "
        f"(torch {config['torch']}, backend {config['backend']} on {config['device']}, {config['nranks']} ranks)",
        f"# Collective test starting: {PROGRAM}",
        f"# nThread 1 nGpus 1 minBytes {config['minimum_bytes']} maxBytes {config['maximum_bytes']} "
        f"step: {config['step_factor']}(factor) warmup iters: {config['warmup_iters']} "
        f"iters: {config['iterations']} agg iters: 1 validation: {config['validation']} graph: 0",
        "#",
        "# Using devices",
    ]
    if config.get("note"):
        lines.insert(3, f"# note: {config['note']}")
    for device in devices:
        lines.append(f"#  Rank {device['rank']:2d} Group  0 Pid {device['pid']:6d} on {device['hostname']:>10s} "
                     f"device {device['device']:2d} [{config['device']}] {device['device_info']}")
    return lines


def op_header_lines(op: str) -> list[str]:
    blank = ("", "", "", "", "")
    return [
        "#",
        f"# Collective test starting: {op}",
        "#",
        "# %10s  %12s  %8s  %6s  %6s           out-of-place                       in-place          " % blank,
        "# %10s  %12s  %8s  %6s  %6s  %7s  %6s  %6s  %6s  %7s  %6s  %6s  %6s" % (
            "size", "count", "type", "redop", "root", "time", "algbw", "busbw", "#wrong",
            "time", "algbw", "busbw", "#wrong"),
        "# %10s  %12s  %8s  %6s  %6s  %7s  %6s  %6s  %6s  %7s  %6s  %6s  %6s" % (
            "(B)", "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(GB/s)", "(GB/s)", ""),
    ]


def _form_text(form: Optional[dict[str, Any]]) -> str:
    if form is None:  # the op has no such form in torch
        return "  %7s  %6s  %6s  %6s" % ("N/A", "N/A", "N/A", "N/A")
    wrong = "%6g" % form["nwrong"] if form["nwrong"] is not None else "   N/A"
    return f"  {_fixed(form['time'], 7)}  {_fixed(form['alg_bw'], 6)}  {_fixed(form['bus_bw'], 6)}  {wrong}"


def row_line(row: dict[str, Any]) -> str:
    preamble = "%12d  %12d  %8s  %6s  %6s" % (row["size"], row["count"], row["type"], row["redop"], "%6i" % row["root"])
    return preamble + _form_text(row["out_of_place"]) + _form_text(row["in_place"])


def forms(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [form for row in rows for form in (row["out_of_place"], row["in_place"]) if form is not None]


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """nccl-tests' footer values: rows (forms) with wrong elements, and the mean bus bandwidth."""
    measured = forms(rows)
    failing = sum(1 for form in measured if form["nwrong"])
    average = statistics.fmean(form["bus_bw"] for form in measured) if measured else None
    checked = [form["nwrong"] for form in measured if form["nwrong"] is not None]
    return {
        "out_of_bounds": {"count": failing, "okay": failing == 0},
        "average_bus_bandwidth": {"bandwidth": average, "okay": "unchecked"},
        # None when no form was checked (check = 0): an unchecked result is not a correct one
        "wrong_total": sum(checked) if checked else None,
    }


def footer_lines(summary: dict[str, Any]) -> list[str]:
    failing = summary["out_of_bounds"]["count"]
    return [
        "# %-20s : %d %s" % ("Out of bounds values", failing, "FAILED" if failing else "OK"),
        "# %-20s : %s " % ("Avg bus bandwidth", "N/A" if summary["average_bus_bandwidth"]["bandwidth"] is None
                            else "%g" % summary["average_bus_bandwidth"]["bandwidth"]),
        "#",
        f"# Collective test concluded: {PROGRAM}",
    ]


ROW_PATTERN = re.compile(r"^\s*\d+\s+\d+\s+\S+\s+\S+\s+-?\d+(\s+\S+){8}\s*$")


def is_table_line(line: str) -> bool:
    return line.startswith("#") or bool(ROW_PATTERN.match(line))


def parse_table(lines: list[str]) -> dict[str, Any]:
    """Rows and footer of a table in nccl-tests' layout (what an nccl-tests parser reads)."""
    rows: list[dict[str, Any]] = []
    op, out_of_bounds, average = None, None, None
    for line in lines:
        if line.startswith("#"):
            if match := re.match(r"# Collective test starting: (\S+)$", line):
                op = match.group(1)
            elif match := re.match(r"# Out of bounds values\s*: (\d+)", line):
                out_of_bounds = int(match.group(1))
            elif match := re.match(r"# Avg bus bandwidth\s*: (\S+)", line):
                average = float(match.group(1))
            continue
        fields = line.split()
        if len(fields) != 13:
            continue

        def form(values: list[str]) -> Optional[dict[str, Any]]:
            if values[0] == "N/A":
                return None
            return {"time": float(values[0]), "alg_bw": float(values[1]), "bus_bw": float(values[2]),
                    "nwrong": None if values[3] == "N/A" else int(float(values[3]))}
        rows.append({"op": op, "size": int(fields[0]), "count": int(fields[1]), "type": fields[2],
                     "redop": fields[3], "root": int(fields[4]),
                     "out_of_place": form(fields[5:9]), "in_place": form(fields[9:13])})
    return {"rows": rows, "out_of_bounds": out_of_bounds, "avg_busbw": average}
