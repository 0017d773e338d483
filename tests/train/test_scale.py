"""The scale stage: run planning, the machine budget, the formulas, and `gonogo scale` end to end."""

from __future__ import annotations

import json
import time

import pytest

from gonogo.errors import StageFailed, UserError
import gonogo.stages.scale.stage as scale
from gonogo.train.config import load_train_config
from gonogo.stages.scale.stage import RunSpec, ScaleSettings, machine_budget, parse_nproc, plan_runs, summarize, timings
from tests.train.train_helpers import TINY


def test_parse_nproc_sorts_and_refuses_nonsense():
    assert parse_nproc("4,1,2,2") == [1, 2, 4]
    for text in ("", "0,1", "one,two"):
        with pytest.raises(UserError, match="--nproc"):
            parse_nproc(text)


def test_strong_keeps_the_global_batch_weak_the_per_rank_batch_and_twins_match_per_rank_work():
    config, _ = load_train_config("tiny-dense")  # global batch 16, micro batch 8
    runs, twins = plan_runs(config, ScaleSettings(nproc=[1, 2, 4]))
    assert [runs[("strong", n)].global_batch for n in (1, 2, 4)] == [16, 16, 16]
    assert [runs[("weak", n)].global_batch for n in (1, 2, 4)] == [4, 8, 16]
    assert {spec.micro_batch for spec in runs.values()} == {4}   # one micro-batch size for every run
    assert runs[("strong", 4)] == runs[("weak", 4)]              # the same job: run once
    assert twins[runs[("strong", 2)]] == RunSpec(2, 8, 4, twin=True)
    assert runs[("strong", 1)] not in twins                      # one process has nothing to communicate
    with pytest.raises(UserError, match="multiple of"):
        plan_runs(config, ScaleSettings(nproc=[1, 3]))


def test_two_processes_on_two_cores_is_the_limit_and_four_is_oversubscribed(monkeypatch):
    monkeypatch.setattr(scale.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    limit = machine_budget([1, 2], None)
    assert limit["threads_per_process"] == 1 and limit["at_core_limit"] and not limit["oversubscribed"]
    assert "limit of this machine" in limit["machine_note"]
    over = machine_budget([1, 2, 4], None)
    assert over["oversubscribed"] and "oversubscribed" in over["machine_note"]
    assert machine_budget([1, 2], 2)["oversubscribed"]          # 2 processes x 2 threads > 2 cores


def _events(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_timings_drop_the_first_window_and_measure_the_rank_spread(tmp_path):
    rows = [{"rank": 0, "step": 2, "step_time_s": 9.0, "tokens_per_second": 1.0, "step_time_s_rank": 9.0},
            {"rank": 1, "step": 2, "step_time_s_rank": 9.0}]
    for step in (4, 6, 8):
        rows += [{"rank": 0, "step": step, "step_time_s": 0.2, "tokens_per_second": 100.0, "step_time_s_rank": 0.1},
                 {"rank": 1, "step": step, "step_time_s_rank": 0.2}]
    _events(tmp_path / "events.jsonl", rows)
    measured = timings(tmp_path)
    assert measured["step_time_s"] == 0.2 and measured["tokens_per_second"] == 100.0
    assert measured["step_time_spread"] == pytest.approx((0.2 - 0.1) / 0.15)


def test_efficiency_and_collective_share_formulas():
    settings = ScaleSettings(nproc=[1, 2])
    runs = {("strong", 1): RunSpec(1, 8, 4), ("strong", 2): RunSpec(2, 8, 4),
            ("weak", 1): RunSpec(1, 4, 4), ("weak", 2): RunSpec(2, 8, 4)}
    measured = {RunSpec(1, 8, 4): {"tokens_per_second": 1000.0, "step_time_s": 0.4, "step_time_spread": 0.0},
                RunSpec(1, 4, 4): {"tokens_per_second": 900.0, "step_time_s": 0.2, "step_time_spread": 0.0},
                RunSpec(2, 8, 4): {"tokens_per_second": 1500.0, "step_time_s": 0.25, "step_time_spread": 0.1}}
    metrics = summarize(settings, runs, measured, {RunSpec(2, 8, 4): 0.2})
    assert metrics["strong_scaling_efficiency"] == pytest.approx(1500 / (2 * 1000))
    assert metrics["weak_scaling_efficiency"] == pytest.approx(1500 / (2 * 900))
    assert metrics["collective_share"] == pytest.approx(1 - 0.2 / 0.25)
    assert metrics["step_time_spread"] == 0.1
    assert set(scale.stage_metrics(settings)) <= set(metrics) | {"oversubscribed", "at_core_limit", "threads_per_process"}


@pytest.mark.slow
def test_gonogo_scale_measures_strong_scaling_collective_share_and_the_machine_limit(tmp_path, capsys):
    # strong mode only keeps this at three launches (n=1, n=2, the n=2 twin); weak mode differs
    # only in the batches, which test_strong_keeps_the_global_batch... and the formula test cover
    from gonogo.cli import main

    out = tmp_path / "run"
    code = main(["scale", "tiny-dense", "--nproc", "1,2", "--mode", "strong", "--steps", "4", "--log-every", "2",
                 "--out", str(out),
                 *TINY, "train.micro_batch_size=4"])
    assert code == 0
    metrics = json.loads((out / "stages" / "scale" / "metrics.json").read_text())
    for name in ("strong_scaling_efficiency", "step_time_spread", "collective_share",
                 "strong_tokens_per_second_n1", "strong_tokens_per_second_n2"):
        assert metrics[name] is not None and metrics[name] >= 0, name
    assert 0 < metrics["strong_scaling_efficiency"] < 5 and 0 <= metrics["collective_share"] <= 1
    twin_results = sorted((out / "stages" / "scale" / "runs" / "twin-n2-b4").glob("process-*/stages/train/result.json"))
    assert [json.loads(p.read_text())["world_size"] for p in twin_results] == [1, 1]
    if len(scale.os.sched_getaffinity(0)) == 2:
        assert metrics["at_core_limit"] is True and metrics["oversubscribed"] is False
        assert "limit of this machine" in capsys.readouterr().out.replace("\n", " ")
    html = (out / "report.html").read_text()
    assert "Scaling efficiency vs processes" in html and "Throughput vs processes" in html


def test_a_run_that_does_not_finish_fails_the_stage_within_its_bound(tmp_path):
    config, _ = load_train_config("tiny-dense", TINY)
    settings = ScaleSettings(nproc=[2], timeout_s=3)
    spec = RunSpec(2, 8, 2)

    class Context:
        def progress(self, text):
            pass

    started = time.monotonic()
    with pytest.raises(StageFailed, match="did not finish within 3 s"):
        scale.run_distributed(scale.run_config(config, spec, settings), spec, tmp_path, 1, settings, Context())
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("args, message", [
    (["--nproc", "1,3"], "multiple of"),
    (["--nproc", "0"], "--nproc 0"),
    (["--nproc", "1,2", "train.nonsense=1"], "nonsense"),
])
def test_input_mistakes_are_one_line_exit_2_before_anything_runs(tmp_path, args, message):
    from tests.conftest import run_gonogo

    result = run_gonogo("scale", "tiny-dense", *args, "--out", tmp_path / "run")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_hung_collective_fails_the_stage_within_the_collective_timeout(tmp_path, monkeypatch):
    # rank 1 stops at step 2 (gonogo.train.fault_injection); rank 0 then waits in a collective until the
    # collective timeout ends it, and the run fails instead of hanging the plan
    monkeypatch.setenv("GONOGO_FAULT", json.dumps({"kind": "hang", "rank": 1, "step": 2}))
    config, _ = load_train_config("tiny-dense", TINY)
    settings = ScaleSettings(nproc=[2], steps=6, collective_timeout_s=5, timeout_s=240)
    spec = RunSpec(2, 8, 2)

    class Context:
        def progress(self, text):
            pass

    started = time.monotonic()
    with pytest.raises(StageFailed, match="exited with code"):
        scale.run_distributed(scale.run_config(config, spec, settings), spec, tmp_path, 1, settings, Context())
    assert time.monotonic() - started < 120
