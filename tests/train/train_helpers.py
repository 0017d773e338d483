"""Helpers of the trainer tests (imported as tests.train.train_helpers)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from gonogo.cli import main

# a 2-layer, d=64 decoder at sequence length 64: seconds per run on 2 CPU cores
TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=4", "model.ffn_dim=128",
        "model.max_seq_len=64", "train.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=2",
        "train.val_batches=1", "train.checkpoint=false",
        "train.max_restarts=0"]  # a crash fails the test instead of rerunning the attempt


def train(out: Path, preset: str, nproc: int, *overrides: str, flags: tuple[str, ...] = ()) -> int:
    return main(["train", preset, "--nproc", str(nproc), "--out", str(out), *flags, *TINY, *overrides])


def rank0_lines(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    return [line for line in lines if line.get("rank") == 0 and "loss" in line]


def losses(run: Path) -> list[float]:
    return [line["loss"] for line in rank0_lines(run)]


def result(run: Path) -> dict:
    return json.loads((run / "stages" / "train" / "result.json").read_text())


def check_mlperf(path: Path) -> subprocess.CompletedProcess:
    """The official MLPerf compliance checker (training, ruleset 6.1.0) on a log file."""
    return subprocess.run([sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", "training",
                           "--ruleset", "6.1.0", str(path)], capture_output=True, text=True, timeout=120,
                          cwd=path.parent)
