"""`gonogo train --out` on a run directory that already has results: they are never replaced by
empty ones; and an interrupted train says so in its state.json (exit 130)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO, run_gonogo
from tests.train.train_helpers import TINY, train

STEPS = ("train.log_every=1", "train.val_every=2", "train.checkpoint=true", "train.checkpoint_every=2")


def test_a_finished_run_is_refused_with_the_same_steps_and_continued_with_more(tmp_path):
    run = tmp_path / "run"
    assert train(run, "tiny-dense", 1, "train.steps=2", *STEPS) == 0
    stage = run / "stages" / "train"
    finished = {name: (stage / name).read_bytes() for name in ("metrics.json", "result.json")}
    assert json.loads(finished["metrics.json"])["val_loss"] is not None
    everything = {path: path.read_bytes() for path in sorted(run.rglob("*")) if path.is_file()}

    # the same command again: one line, exit 2, before any worker; not a byte changed
    started = time.monotonic()
    completed = run_gonogo("train", "tiny-dense", "--out", run, *TINY, "train.steps=2", *STEPS, cwd=tmp_path)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr, completed.stderr
    assert completed.stderr.strip().splitlines() == [
        f"gonogo train: error: {run}: its train already finished 2 steps (results in "
        f"{stage / 'metrics.json'}); set train.steps above 2 to continue it, or choose another --out"]
    assert {path: path.read_bytes() for path in sorted(run.rglob("*")) if path.is_file()} == everything
    assert time.monotonic() - started < 60  # refused up front, not after a training

    # more steps: the run continues from its step-2 checkpoint; the finished results move aside intact
    assert train(run, "tiny-dense", 1, "train.steps=3", *STEPS) == 0
    kept = run / "stages" / "train.attempt-1"
    assert {name: (kept / name).read_bytes() for name in finished} == finished
    assert (kept / "mlperf.log").read_bytes() == everything[run / "mlperf.log"]
    continued = json.loads((stage / "metrics.json").read_text())
    assert continued["resumed_from_step"] == 2 and continued["steps_completed"] == 3
    assert continued["tokens_per_second"] is not None
    assert json.loads((run / "state.json").read_text())["stages"]["train"]["status"] == "passed"


def test_an_interrupted_train_records_it_in_state_json_and_exits_130(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    log = (tmp_path / "train.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "gonogo", "train", "tiny-dense", "--out", str(run), *TINY, "train.steps=100000",
         "train.log_every=1"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # wait (bounded) until the workers train, so the interrupt lands mid-run
        events = run / "events.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if events.is_file() and '"loss"' in events.read_text():
                break
            time.sleep(0.2)
        assert process.poll() is None, (tmp_path / "train.log").read_text()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        log.close()
    output = (tmp_path / "train.log").read_text()
    assert code == 130, output
    assert "Traceback" not in output and output.strip().splitlines()[-1] == "gonogo train: interrupted"
    record = json.loads((run / "state.json").read_text())["stages"]["train"]
    assert record["status"] == "interrupted"
    assert f"--out {run}" in record["reason"]
    assert not (run / "stages" / "train" / "metrics.json").exists()  # nothing measured, nothing claimed
    assert [p for p in Path(run).rglob("*.tmp*")] == []
