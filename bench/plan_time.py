"""Where the default plan's wall time goes: per stage, wall seconds, CPU-seconds and processes.

Runs ``python -m gonogo run [PLAN] --out DIR`` as a child and samples its whole process tree
every 0.25 s (psutil): the CPU-seconds of the tree (every live process's own time plus what its
reaped children used, so a process that ended between two samples still counts) and every
process that appeared (its command line and how long it lived). The stage boundaries come from
the run's events.jsonl. On a loaded machine the wall times stretch with the load; the
CPU-seconds do not (much), so they are what to compare between two loaded runs.

    python bench/plan_time.py --out /tmp/plan-run [--plan quick] [--json breakdown.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

SAMPLE_S = 0.25


def _tree_cpu(root: psutil.Process, seen: dict[int, dict[str, Any]], now: float) -> float:
    """CPU-seconds used so far by the tree under ``root`` (live processes plus their reaped children)."""
    total = 0.0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    for process in processes:
        try:
            with process.oneshot():
                times = process.cpu_times()
                key = process.pid
                if key not in seen:
                    seen[key] = {"pid": key, "start": now, "cmd": " ".join(process.cmdline())[:200]}
                seen[key]["end"] = now
                seen[key]["cpu"] = times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def _stage_bounds(events_path: Path) -> list[tuple[str, float, float]]:
    starts: dict[str, float] = {}
    bounds = []
    if not events_path.is_file():
        return bounds
    for line in events_path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "stage_start":
            starts[record["stage"]] = record["time"]
        elif record.get("event") == "stage_end" and record["stage"] in starts:
            bounds.append((record["stage"], starts.pop(record["stage"]), record["time"]))
    return bounds


def _cpu_at(samples: list[tuple[float, float]], when: float) -> float:
    """The tree's cumulative CPU-seconds at ``when`` (linear between the two samples around it)."""
    before = [s for s in samples if s[0] <= when]
    after = [s for s in samples if s[0] >= when]
    if not before:
        return samples[0][1] if samples else 0.0
    if not after:
        return before[-1][1]
    (t0, c0), (t1, c1) = before[-1], after[0]
    return c0 if t1 == t0 else c0 + (c1 - c0) * (when - t0) / (t1 - t0)


def _short(cmd: str) -> str:
    for marker in ("gonogo.train.worker", "gonogo serve", "-m gonogo", "torchrun", "torch.distributed.run"):
        if marker in cmd:
            return cmd[cmd.find(marker):][:90]
    return cmd[:90]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="the run directory (must not exist)")
    parser.add_argument("--plan", default=None, help="plan name or path (default: the built-in laptop plan)")
    parser.add_argument("--json", type=Path, default=None, help="also write the breakdown here")
    args = parser.parse_args()

    command = [sys.executable, "-m", "gonogo", "run", *([args.plan] if args.plan else []), "--out", str(args.out)]
    load_before = os.getloadavg()
    started = time.time()
    child = subprocess.Popen(command)
    root = psutil.Process(child.pid)
    seen: dict[int, dict[str, Any]] = {}
    samples: list[tuple[float, float]] = []
    while child.poll() is None:
        now = time.time()
        samples.append((now, _tree_cpu(root, seen, now)))
        time.sleep(SAMPLE_S)
    ended = time.time()
    own = psutil.Process().cpu_times()
    samples.append((ended, own.children_user + own.children_system))
    load_after = os.getloadavg()

    rows = []
    for name, begin, end in _stage_bounds(args.out / "events.jsonl"):
        procs = [p for p in seen.values() if begin <= p["start"] <= end and p["pid"] != child.pid]
        rows.append({"stage": name, "wall_s": round(end - begin, 1),
                     "cpu_s": round(_cpu_at(samples, end) - _cpu_at(samples, begin), 1),
                     "processes": len(procs),
                     "commands": sorted({_short(p["cmd"]) for p in procs})})
    result = {"command": command, "exit_code": child.returncode, "wall_s": round(ended - started, 1),
              "cpu_s": round(samples[-1][1], 1), "load_before": load_before, "load_after": load_after,
              "processes_started": len(seen) - 1, "stages": rows}

    print(f"{'stage':<22}{'wall s':>8}{'CPU s':>8}{'procs':>7}")
    for row in rows:
        print(f"{row['stage']:<22}{row['wall_s']:>8.1f}{row['cpu_s']:>8.1f}{row['processes']:>7}")
    print(f"{'total':<22}{result['wall_s']:>8.1f}{result['cpu_s']:>8.1f}{result['processes_started']:>7}")
    print(f"exit code {child.returncode}; load average before {load_before[0]:.2f} {load_before[1]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return child.returncode


if __name__ == "__main__":
    raise SystemExit(main())
