"""train.checkpoint_async: the training loop saves through DCP's async path under real torchrun + gloo.

One process keeps it short: the multi-rank async save itself is tested in test_checkpoint_distributed.py.
"""

from __future__ import annotations

import json

import pytest

from gonogo.train.fault_injection import Fault


def _events(root):
    return [json.loads(line) for line in (root / "events.jsonl").read_text().splitlines()]


@pytest.mark.timeout(300)
def test_async_checkpoints_commit_only_when_written_and_resume_after_a_crash_mid_save(tmp_path):
    from gonogo.drills.fault_drills import TINY
    from gonogo.procs import run_process
    from gonogo.rundir import RunDir
    from gonogo.checkpoints import manifest
    from gonogo.train.config import load_train_config
    from gonogo.stages.train.stage import launch

    config, path = load_train_config("tiny-dense", TINY + [
        "train.steps=2", "train.checkpoint_every=1", "train.checkpoint_async=true", "train.log_every=1",
        "train.val_every=0", "train.max_restarts=1", "train.straggler_every=0"], deterministic=True)
    run_dir = RunDir.create(tmp_path / "run", plan_name="async")
    stage_dir = run_dir.stage_dir("train")

    def run_command(argv, *, timeout, log_name, env=None, on_line=None):
        return run_process(argv, timeout=timeout, log_path=stage_dir / log_name, env=env, on_line=on_line)

    # rank 0 dies inside the async save of step 2: its files are written, COMMITTED is not yet
    metrics = launch(config, path.name, 1, run_dir=run_dir, stage="train", stage_dir=stage_dir, resume="never",
                     timeout_s=240, run_command=run_command, on_update=lambda update: None,
                     env=Fault("torn-checkpoint", rank=0, step=2).to_env())
    events = _events(run_dir.root)
    torn = [e for e in events if e.get("event") == "fault_injected"]
    assert len(torn) == 1 and torn[0]["step"] == 2
    # the save the crash interrupted never looked like a checkpoint: the restart resumed from step 1
    attempts = [e for e in events if e.get("event") == "attempt_started"]
    assert [a["restart"] for a in attempts] == [0, 1]
    assert attempts[1]["resumed_from"].endswith("step-00000001")
    assert metrics["restarts"] == 1 and metrics["resumed_from_step"] == 1 and metrics["steps_completed"] == 2

    # the resumed attempt repeats step 2 with the same loss (deterministic): the async
    # checkpoint restored the model, the optimizer and the data position
    losses: dict[int, list[float]] = {}
    for line in events:
        if line.get("rank") == 0 and "loss" in line and "event" not in line:
            losses.setdefault(line["step"], []).append(line["loss"])
    assert len(losses[2]) == 2 and losses[2][0] == losses[2][1] and len(losses[1]) == 1

    # the loop's blocked time per save is in the events and the metrics
    saves = [e for e in events if e.get("event") == "checkpoint_saved"]
    assert [e["step"] for e in saves] == [1, 2, 2]
    assert all(e["asynchronous"] is True and e["committed_on_return"] is False and e["blocked_s"] > 0
               for e in saves)
    assert metrics["checkpoint_async"] is True and metrics["checkpoint_saves"] == 1
    assert metrics["checkpoint_blocked_s_max"] == pytest.approx(saves[-1]["blocked_s"])
    assert metrics["checkpoint_final_wait_s"] >= 0
    checkpoints = run_dir.root / "checkpoints" / "train"
    assert manifest.verify_checkpoint(checkpoints / "step-00000001") == (True, "ok")
    assert manifest.verify_checkpoint(checkpoints / "step-00000002") == (True, "ok")
