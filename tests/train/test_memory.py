"""OOM behaviour: the CPU memory cap, an OOM on one rank stopping the whole job with one line,
and the search for the largest micro-batch that fits."""

from __future__ import annotations

import json
import os
import time

import pytest

import gonogo.stages.memory.stage as memory_stage
from gonogo.train import memory, memory_probe

TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=4", "model.ffn_dim=128",
        "model.max_seq_len=64", "train.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=2",
        "train.val_batches=1", "train.val_every=0", "train.warmup_steps=2", "train.checkpoint=false"]


def _fits_below(limit, calls):
    def fits(size):
        calls.append(size)
        return {"fits": size <= limit, "peak_GB": size / 100, "oom": False, "seconds": 0.0}
    return fits


def _drive(limit, max_size=1024, max_trials=16):
    """The parent's loop: a fresh 'process' after every size that did not fit."""
    calls, result = [], {"max_micro_batch_size": None, "smallest_failing": None, "trials": []}
    for _ in range(max_trials):
        result = memory.search_sizes(_fits_below(limit, calls), max_size=max_size, max_trials=max_trials,
                                     largest=result["max_micro_batch_size"], failing=result["smallest_failing"],
                                     trials=result["trials"], stop_on_failure=True)
        if result["done"]:
            break
    return result, calls


def test_search_doubles_then_bisects_to_the_exact_largest_size():
    result, calls = _drive(37)
    assert result["max_micro_batch_size"] == 37 and result["smallest_failing"] == 38
    assert result["bounded_by"] is None
    assert calls[:7] == [1, 2, 4, 8, 16, 32, 64] and len(calls) == 12  # 6 halvings of 32..64 after doubling


def test_search_bounds_nothing_fits_and_the_size_and_trial_limits():
    assert _drive(0)[0]["max_micro_batch_size"] is None and _drive(0)[1] == [1]
    bounded, calls = _drive(10_000, max_size=100)
    assert bounded["max_micro_batch_size"] == 100 and bounded["bounded_by"] == "max_micro_batch"
    assert calls[-1] == 100 and len(calls) == 8
    short, calls = _drive(37, max_trials=8)
    assert len(calls) == 8 and short["bounded_by"] == "max_trials" and short["max_micro_batch_size"] == 32


def test_recommended_size_divides_the_per_rank_batch():
    assert memory.recommended(37, 64, 2) == 32
    assert memory.recommended(5, 48, 2) == 4
    assert memory.recommended(None, 64, 2) is None


def test_memory_guard_and_the_one_line(tmp_path):
    memory.MemoryGuard("cpu", None).check(1)
    memory.MemoryGuard("cuda", 0.001).check(1)  # CUDA's allocator raises by itself
    with pytest.raises(memory.MemoryCapExceeded) as caught:
        memory.MemoryGuard("cpu", 0.001).check(4)
    assert caught.value.needed_bytes > caught.value.cap_bytes and caught.value.step == 4
    assert memory.is_oom(caught.value) and not memory.is_oom(RuntimeError("x"))
    assert memory.oom_message(tmp_path, "train") is None
    record = memory.oom_record(caught.value, rank=1, device_type="cpu", micro_batch_size=8)
    (tmp_path / "oom-rank-00001.json").write_text(json.dumps(record))
    line = memory.oom_message(tmp_path, "train")
    assert line.startswith("train: out of memory on rank(s) 1 at step 4: needed ")
    assert "train.micro_batch_size (now 8" in line and "raise train.memory_cap_GB" in line and "\n" not in line


def test_cuda_oom_record_reads_what_was_asked():
    import torch

    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity")
    record = memory.oom_record(error, rank=0, device_type="cuda", micro_batch_size=16)
    assert record["asked_bytes"] == 2 * 2**30 and record["limit_setting"] == "the GPU's memory"


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_oom_on_one_rank_stops_every_rank_with_one_line_and_nothing_left(tmp_path, monkeypatch, capsys):
    from gonogo.cli import main

    # rank 1 fills 1 GB after step 2; the next step's check finds it over the 0.9 GB cap (the ranks use ~0.4)
    monkeypatch.setenv("GONOGO_FAULT", json.dumps({"kind": "oom", "rank": 1, "step": 2, "factor": 1.0}))
    started = time.monotonic()
    code = main(["train", "tiny-dense", "--nproc", "2", "--out", str(tmp_path / "run"), "--timeout", "150",
                 *TINY, "train.steps=50", "train.memory_cap_GB=0.9", "train.max_restarts=2"])
    seconds = time.monotonic() - started
    assert code == 1
    error = " ".join(capsys.readouterr().err.split())
    assert "train: out of memory on rank(s) 1 at step 3: needed 1." in error, error
    assert "lower train.micro_batch_size (now 2;" in error
    assert seconds < 120  # no restart: an OOM would repeat
    stage = tmp_path / "run" / "stages" / "train"
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [e["restart"] for e in events if e.get("event") == "attempt_started"] == [0]  # never restarted
    pids = [json.loads(path.read_text())["pid"] for path in (stage / "heartbeats").glob("rank-*.json")]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in pids if _alive(pid)]
        time.sleep(0.2)
    assert alive == []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_probe_runs_the_real_model_under_torchrun(tmp_path):
    from gonogo.procs import run_process
    from gonogo.train.config import load_train_config

    config, path = load_train_config("tiny-dense", TINY + ["train.memory_cap_GB=50"])

    def run_command(argv, *, timeout, log_name, env=None, on_line=None):
        return run_process(argv, timeout=timeout, log_path=tmp_path / log_name, env=env, on_line=on_line)

    result = memory_probe.find_max_batch(config, path.name, 1, run_dir=tmp_path, stage_dir=tmp_path / "memory",
                                   timeout_s=150, run_command=run_command, max_micro_batch=4)
    assert [t["micro_batch_size"] for t in result["trials"]] == [1, 2, 4]
    assert all(t["fits"] and t["peak_GB"] > 0.1 for t in result["trials"])
    assert result["max_micro_batch_size"] == 4 and result["bounded_by"] == "max_micro_batch"
    assert result["recommended_micro_batch_size"] == 4 and result["limit_GB"] == 50.0
    assert "the search stopped at its bound 4, more may fit" in memory_stage.result_line(result)
