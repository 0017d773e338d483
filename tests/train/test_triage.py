"""The triage bundle: a hung rank is named with its step and frame, every rank's stack is kept,
and the diagnosis follows the ranks' records (collective counts, stacks, missing ranks, exceptions)."""

from __future__ import annotations

import json
import types

import pytest

from gonogo.drills import fault_drills
from gonogo.train import triage
from gonogo.train.fault_injection import Fault


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_hang_drill_bundle_names_the_injected_rank_and_its_frame(tmp_path):
    # no restart: the bundle is written whether the run recovers (the drill) or fails (this test, faster)
    drill = fault_drills.Drill(tmp_path, steps=12, checkpoint_every=4, overrides=["train.max_restarts=0"])
    fault = Fault(kind="hang", rank=1, step=6)
    run = drill.train("hang-1", env=fault.to_env())
    assert run["metrics"] is None and "exited with code" in run["error"]
    outcome = fault_drills.triage_outcome(run["run_dir"], fault)
    assert outcome["triage_named"] is True, outcome
    folder = run["run_dir"] / "triage" / "train-attempt-0"
    report = (folder / "report.md").read_text().splitlines()
    assert report[0].startswith("# What hung (hang): rank 1 at step 6, outside any collective")
    assert "fault_injection.py" in report[0] and "in after_step" in report[0]
    # every rank's stack at detection, and the peer's wait inside a collective
    for rank in (0, 1):
        assert "most recent call first" in (folder / f"rank-0000{rank}.stack.txt").read_text()
    bundle = json.loads((folder / "triage.json").read_text())
    assert bundle["diagnosis"]["peers_waited_in"].startswith("rank 0: ")
    assert bundle["nvml"]["available"] is False and bundle["nvml"]["reason"].startswith("unknown: ")
    assert "train-attempt-0/`: What hung (hang): rank 1" in (tmp_path / "hang-1" / "triage" / "README.md").read_text()
    from gonogo.stages.train.stage import report as stage_report

    items = stage_report(tmp_path / "hang-1" / "stages" / "train", {})
    assert items[0].title == "Triage: what hung" and items[0].table[0]["what hung"] == report[0][2:]


def _record(rank, count, *, main=None, in_flight=None, step=5, exception=None):
    record = {"rank": rank, "world_size": 2, "reason": "hang", "watchdog": {"step": step},
              "collectives": {"count": count, "in_flight": in_flight, "recent": [
                  {"op": "all_reduce", "seq": count, "frame": "/g/gonogo/train/loop.py:330 in train"}]},
              "stacks": {"main": main or [{"file": "/g/gonogo/train/loop.py", "line": 300, "function": "train"}]}}
    if exception:
        record["exception"] = exception
        record["exception_frames"] = [{"file": "/g/gonogo/train/loop.py", "line": 310, "function": "train"}]
    return record


def test_diagnosis_names_the_rank_behind_in_collectives():
    records = {0: _record(0, 40, in_flight={"op": "all_reduce", "seq": 40, "frame": "/g/loop.py:330 in train"}),
               1: _record(1, 39)}
    diagnosis = triage.diagnose(records, 2)
    assert diagnosis["rank"] == 1 and diagnosis["step"] == 5
    assert diagnosis["frame"] == "/g/gonogo/train/loop.py:300 in train"
    assert diagnosis["peers_waited_in"].startswith("rank 0: all_reduce #40")
    assert triage.what_hung_line(diagnosis, "hang").startswith("What hung (hang): rank 1 at step 5")


def test_diagnosis_from_stacks_when_counts_are_equal():
    # FSDP2's all-gather is not a wrapped name: rank 0's stack shows it waiting inside torch.distributed
    waiting = [{"file": "/g/gonogo/train/loop.py", "line": 305, "function": "train"},
               {"file": "/site/torch/distributed/distributed_c10d.py", "line": 4394, "function": "all_gather_single"}]
    hung = [{"file": "/g/gonogo/train/fault_injection.py", "line": 124, "function": "after_step"}]
    diagnosis = triage.diagnose({0: _record(0, 58, main=waiting), 1: _record(1, 58, main=hung)}, 2)
    assert diagnosis["rank"] == 1 and diagnosis["frame"].endswith("fault_injection.py:124 in after_step")
    assert "all_gather_single" in diagnosis["peers_waited_in"]


def test_diagnosis_when_nothing_tells_the_ranks_apart_names_no_rank():
    diagnosis = triage.diagnose({0: _record(0, 10), 1: _record(1, 10)}, 2)
    assert diagnosis["rank"] is None and diagnosis["frame"] == "unknown"
    assert "no single rank" in triage.what_hung_line(diagnosis, "hang")


def test_a_rank_without_record_or_with_an_exception_is_named_first():
    assert triage.diagnose({0: _record(0, 10)}, 2)["rank"] == 1
    diagnosis = triage.diagnose({0: _record(0, 10), 1: _record(1, 12, exception="Traceback\nRuntimeError: boom")}, 2)
    assert diagnosis["rank"] == 1 and diagnosis["exception"] == "RuntimeError: boom"


def test_collective_log_records_calls_and_the_one_in_flight():
    seen = {}

    def all_reduce(tensor, async_op=False):
        seen["in_flight"] = log.snapshot()["in_flight"]
        return "done"

    module = types.SimpleNamespace(all_reduce=all_reduce)
    log = triage.CollectiveLog(step_of=lambda: 7).install(module)
    assert module.all_reduce(1) == "done"
    assert seen["in_flight"]["op"] == "all_reduce" and seen["in_flight"]["step"] == 7
    assert "test_triage.py" in seen["in_flight"]["frame"]
    snapshot = log.snapshot()
    assert snapshot["count"] == 1 and snapshot["in_flight"] is None and snapshot["recent"][0]["seconds"] >= 0
    log.uninstall()
    assert module.all_reduce is all_reduce


def test_an_exception_is_recorded_and_a_user_error_is_not(tmp_path, monkeypatch):
    from gonogo.errors import UserError

    state = {"step": 3}
    watchdog = types.SimpleNamespace(state=lambda: dict(state))
    rank = triage.Triage(run_dir=tmp_path, stage="train", stage_dir=tmp_path / "stage", rank=0, world_size=1,
                         attempt=0, watchdog=watchdog, peer_wait_s=0.5)
    monkeypatch.setattr(triage, "_current", rank)
    triage.on_exception(UserError("bad setting"))
    assert not (tmp_path / "triage").exists()
    try:
        raise RuntimeError("Connection closed by peer: timed out after 30 s")
    except RuntimeError as error:
        triage.on_exception(error)
    reports = triage.finish(tmp_path, "train", tmp_path / "stage")
    first = reports[0].read_text().splitlines()[0]
    assert first.startswith("# What hung (collective timeout): rank 0 at step 3")
    assert "test_triage.py" in first and "timed out after 30 s" in first


def test_drill_outcome_with_another_rank_or_no_bundle_is_not_named(tmp_path):
    folder = tmp_path / "triage" / "train-attempt-0"
    folder.mkdir(parents=True)
    frame = {"file": "/g/gonogo/train/fault_injection.py", "line": 124, "function": "after_step"}
    (folder / "triage.json").write_text(json.dumps({"what_hung": "x", "diagnosis": {
        "rank": 0, "step": 6, "frame_detail": frame}}))
    assert fault_drills.triage_outcome(tmp_path, Fault("hang", 0, 6))["triage_named"] is True
    assert fault_drills.triage_outcome(tmp_path, Fault("hang", 1, 6))["triage_named"] is False
    assert fault_drills.triage_outcome(tmp_path / "none", Fault("hang", 1, 6)) == {"triage_bundle": None,
                                                                           "triage_named": False}
    assert fault_drills.summarize("hang", [{"triage_named": False}])["triage_named"] is False


CRASH = """
import ctypes, sys
from pathlib import Path
from gonogo.train.triage import Triage

Triage(run_dir=Path(sys.argv[1]), stage="train", stage_dir=Path(sys.argv[2]), rank=1, world_size=2, attempt=0).start()


def crash_here():
    ctypes.string_at(0)


crash_here()
"""


def test_a_segfault_leaves_a_bundle_naming_the_crashed_frame(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    stage_dir = tmp_path / "stages" / "train"
    done = subprocess.run([sys.executable, str(script), str(tmp_path), str(stage_dir)], capture_output=True,
                          timeout=120, check=False)
    assert done.returncode < 0  # killed by SIGSEGV
    reports = triage.finish(tmp_path, "train", stage_dir)
    first = reports[0].read_text().splitlines()[0]
    assert first.startswith("# What hung (fatal error): rank 1 at an unknown step")
    # the innermost Python frame is ctypes' (the native crash is below it); the caller is next
    assert "ctypes/__init__.py" in first and "in string_at" in first and "Segmentation fault" in first
    bundle = json.loads((reports[0].parent / "triage.json").read_text())
    assert bundle["diagnosis"]["why"].startswith("crashed in native code")
    assert "crash.py:10 in crash_here" in (reports[0].parent / "rank-00001.attempt-0.fatal.txt").read_text().replace(
        '", line ', ":")
    assert (reports[0].parent / "rank-00001.attempt-0.fatal.txt").is_file()


TINY_TRAIN = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=2", "model.ffn_dim=64",
              "model.max_seq_len=32", "train.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2",
              "train.val_batches=1", "train.checkpoint=false", "train.steps=40", "train.log_every=1",
              "train.val_every=0", "train.warmup_steps=1", "train.max_restarts=0", "train.watchdog_timeout_s=600"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_stage_stopped_by_its_own_timeout_leaves_a_bundle_and_the_report_opens_with_it(write_plan, tmp_path):
    """The watchdog is set far off: the runner's timeout_s stops the hung stage, and asks every
    rank for its stack first; report.html opens with what hung, before the verdict and the stages."""
    from tests.conftest import run_gonogo

    plan = write_plan(f"""
    [plan]
    name = "stage-timeout"
    [[stage]]
    name = "train"
    kind = "train"
    nproc = 2
    timeout_s = 45
    overrides = {json.dumps(TINY_TRAIN)}
    gates = ["steps >= 1"]
    """)
    out = tmp_path / "run"
    fault = Fault(kind="hang", rank=1, step=2)
    result = run_gonogo("run", plan, "--out", out, env=fault.to_env(), timeout=200)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    folder = out / "triage" / "train-attempt-0"
    bundle = json.loads((folder / "triage.json").read_text())
    assert bundle["reason"] == "stage timeout" and bundle["requested_by"] == "runner"
    assert sorted(bundle["heartbeats"]) == ["0", "1"]  # both ranks answered before the kill
    assert bundle["what_hung"].startswith("What hung (stage timeout): rank 1 at step 2"), bundle["what_hung"]
    assert "fault_injection.py" in bundle["what_hung"]
    html = (out / "report.html").read_text()
    first = html.index("What hung (stage timeout): rank 1 at step 2")
    assert first < html.index('<div class="verdict">') < html.index("<h2>Stages</h2>")


def test_the_hook_before_a_timeout_stop_runs_while_the_group_lives_and_only_inside_its_block(tmp_path):
    import sys

    from gonogo.procs import ProcessTimeout, before_timeout_stop, run_process

    marker = tmp_path / "alive"
    seen = []

    def hook():
        seen.append(marker.exists())

    argv = [sys.executable, "-c", f"import pathlib, time; pathlib.Path({str(marker)!r}).touch(); time.sleep(60)"]
    with before_timeout_stop(hook), pytest.raises(ProcessTimeout):
        run_process(argv, timeout=3)
    assert seen == [True]
    with pytest.raises(ProcessTimeout):
        run_process(argv, timeout=0.5)
    assert seen == [True]  # outside the block: no hook


def test_asking_the_ranks_of_a_stage_that_never_started_one_is_a_no_op(tmp_path):
    assert triage.ask_ranks(tmp_path, "train", tmp_path / "stages" / "train", "timeout", wait_s=0.1) is None
    assert not (tmp_path / "triage").exists()
