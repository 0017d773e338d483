"""The load tester against our server, its arrival process, and the serve + loadtest stages."""

import json
import math
import os
import signal

import numpy as np
import pytest

from gonogo.errors import UserError
from gonogo.stages.loadtest.stage import LoadSettings, arrival_gaps, parse_goodput, run_load
from gonogo.rundir import RunDir
from gonogo.stages import get_kind
from gonogo.stages.base import StageContext

from .conftest import API_KEY, KEY_ENV

VLLM_FIELDS = [
    "duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
    "request_goodput", "output_throughput", "total_token_throughput", "max_output_tokens_per_s",
    "max_concurrent_requests", "input_lens", "output_lens", "ttfts", "itls", "generated_texts", "errors",
] + [f"{stat}_{metric}_ms" for metric in ("ttft", "tpot", "itl", "e2el")
     for stat in ("mean", "median", "std", "p90", "p95", "p99")]
GATES = ["ttft_p95_ms", "e2el_p99_ms", "tpot_p95_ms", "success_rate", "output_tokens_per_second", "request_goodput"]


def test_load_test_against_our_server_fills_every_field(server):
    settings = LoadSettings(url=server.url, rate=20.0, num_requests=12, warmup=1, max_tokens=16,
                            api_key=API_KEY, goodput={"ttft": 60_000, "e2el": 60_000})
    result = run_load(settings)
    missing = [name for name in VLLM_FIELDS + GATES if name not in result]
    assert not missing
    assert result["completed"] == 12 and result["failed"] == 0 and result["success_rate"] == 1.0
    assert result["total_output_tokens"] == sum(result["output_lens"]) and 12 <= result["total_output_tokens"] <= 192
    assert all(t > 0 for t in result["ttfts"]) and result["p99_ttft_ms"] >= result["median_ttft_ms"]
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    json.dumps(result)  # serialisable as is


def test_completions_endpoint_with_concurrency_cap_and_a_strict_slo(server):
    settings = LoadSettings(url=server.url, endpoint="completions", max_concurrency=2, num_requests=6,
                            warmup=0, max_tokens=8, api_key=API_KEY, goodput={"ttft": 0.001})
    result = run_load(settings)
    assert result["completed"] == 6 and result["max_concurrent_requests"] <= 2
    assert result["request_goodput"] == 0.0  # nobody meets a 1 µs TTFT


def test_failures_are_counted_with_their_reason(server):
    settings = LoadSettings(url=server.url, num_requests=3, warmup=0, model="gonogo", api_key="wrong")
    result = run_load(settings)
    assert result["failed"] == 3 and result["success_rate"] == 0.0
    # no request completed: no latency was measured, and none is reported as 0 ms
    for name in ("ttft_p95_ms", "ttft_p99_ms", "e2el_p99_ms", "tpot_p95_ms", "itl_p95_ms", "mean_ttft_ms"):
        assert result[name] is None, name
    assert result["unknown"]["ttft_p95_ms"] == "no request completed (3 of 3 failed)"
    assert list(result["failure_reasons"]) == ["HTTP 401: missing or wrong API key: send 'Authorization: Bearer <key>'"]


def test_gamma_arrivals_have_the_requested_rate():
    gaps = arrival_gaps(LoadSettings(url="http://x", rate=10.0, burstiness=0.5), 20_000)
    assert np.mean(gaps) == pytest.approx(0.1, rel=0.05)
    assert np.var(gaps) == pytest.approx(0.1 ** 2 / 0.5, rel=0.1)  # burstier than Poisson
    assert not arrival_gaps(LoadSettings(url="http://x", rate=math.inf), 5).any()


def test_goodput_flag_parsing():
    assert parse_goodput(["ttft:200", "e2el:1500"]) == {"ttft": 200.0, "e2el": 1500.0}
    for bad in (["latency:5"], ["ttft:fast"], ["ttft:-1"], ["ttft"]):
        with pytest.raises(UserError):
            parse_goodput(bad)


def test_serve_then_loadtest_stages(checkpoint_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    run_dir = RunDir.create(tmp_path / "run", "laptop")
    serve = get_kind("serve")
    context = StageContext(name="serve", kind="serve", run_dir=run_dir, stage_dir=run_dir.stage_dir("serve"))
    metrics = serve.run(context, serve.settings(checkpoint=str(checkpoint_dir), api_key_env=KEY_ENV))
    assert set(metrics) == serve.metrics(None)
    assert metrics["healthy"] and metrics["stream_matches"]
    server = json.loads((run_dir.stage_dir("serve") / "server.json").read_text())
    try:
        loadtest = get_kind("loadtest")
        settings = loadtest.settings(num_requests=5, warmup=1, max_tokens=8, rate=50.0, api_key_env=KEY_ENV)
        context = StageContext(name="load", kind="loadtest", run_dir=run_dir, stage_dir=run_dir.stage_dir("load"))
        metrics = loadtest.run(context, settings)
        assert set(GATES) <= set(metrics) <= loadtest.metrics(settings)
        assert metrics["success_rate"] == 1.0
        result = json.loads((run_dir.stage_dir("load") / "result.json").read_text())
        assert result["completed"] == 5
        items = loadtest.report(run_dir.stage_dir("load"), metrics)
        assert items and items[0].table[0]["metric"] == "TTFT (ms)"
        assert '"stage": "load"' in run_dir.events_path.read_text()
    finally:
        os.killpg(server["pid"], signal.SIGTERM)


def test_loadtest_command_writes_the_json(server, tmp_path):
    from tests.conftest import run_gonogo

    out, run = tmp_path / "result.json", tmp_path / "run"
    result = run_gonogo("loadtest", "--url", server.url, "--num-requests", "4", "--rate", "20", "--warmup", "1",
                        "--max-tokens", "8", "--api-key-env", KEY_ENV, "--goodput", "ttft:60000", "--json", out,
                        "--out", run, env={KEY_ENV: API_KEY}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "TTFT (ms)" in result.stdout and "GO" in result.stderr  # the table on stdout, the runner's view on stderr
    data = json.loads(out.read_text())
    assert data["completed"] == 4 and not [name for name in VLLM_FIELDS if name not in data]
    # --json is a copy of the stage's result, key for key
    assert out.read_bytes() == (run / "stages" / "loadtest" / "result.json").read_bytes()
    assert API_KEY not in (run / "plan.toml").read_text()  # the variable's name is kept, never the key


# -- `gonogo loadtest` through the plan runner, against the stand-in server ----------------------------

def test_loadtest_command_is_the_stage_through_the_runner(tmp_path):
    import tomllib

    from tests.conftest import run_gonogo
    from tests.stub_openai import stub_server

    with stub_server("ok") as url:
        result = run_gonogo("loadtest", "--url", url, "--num-requests", "5", "--warmup", "0", "--rate", "50",
                            "--duration", "30", "--out", tmp_path / "go", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "go"
    for name in ("plan.toml", "state.json", "summary.json", "report.html", "events.jsonl"):
        assert (run / name).is_file(), name
    stage = tomllib.loads((run / "plan.toml").read_text())["stage"][0]
    assert stage["kind"] == "loadtest" and stage["url"] == url and stage["gates"] == ["success_rate == 1"]
    assert stage["duration"] == 30 and stage["time_limit_s"] == 30 and "rate" in stage
    metrics = json.loads((run / "stages" / "loadtest" / "metrics.json").read_text())
    assert metrics["completed"] == 5 and metrics["success_rate"] == 1.0
    state = json.loads((run / "state.json").read_text())
    assert state["stages"]["loadtest"]["status"] == "passed"
    assert json.loads((run / "summary.json").read_text())["verdict"] == "GO"
    assert "TTFT (ms)" in result.stdout and "Latency" in (run / "report.html").read_text()


def test_loadtest_command_with_failed_requests_is_no_go(tmp_path):
    from tests.conftest import run_gonogo
    from tests.stub_openai import stub_server

    with stub_server("fail") as url:
        result = run_gonogo("loadtest", "--url", url, "--num-requests", "3", "--warmup", "0",
                            "--json", tmp_path / "result.json", "--out", tmp_path / "run", timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["verdict"] == "NO-GO"
    assert summary["gates"][0]["expression"] == "success_rate == 1" and summary["gates"][0]["measured"] == 0
    data = json.loads((tmp_path / "result.json").read_text())  # written all the same: what failed, and why
    assert data["failed"] == 3 and data["failure_reasons"] == {"HTTP 500: engine failure (injected)": 3}
    assert "3 × HTTP 500" in result.stdout


def test_loadtest_command_refuses_a_bad_flag_in_one_line(tmp_path):
    from tests.conftest import run_gonogo

    result = run_gonogo("loadtest", "--url", "http://127.0.0.1:9", "--goodput", "latency:5", "--out", tmp_path / "run",
                        timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--goodput" in result.stderr
    for flags, words in ((["--rate", "0"], "rate must be > 0"), (["--api-key-env", "GONOGO_UNSET_VARIABLE"], "not set"),
                         (["--dataset", "missing.jsonl"], "no such file"), (["--time-limit", "0"], "--time-limit"),
                         (["--duration", "5"], "without end")):
        result = run_gonogo("loadtest", "--url", "http://127.0.0.1:9", *flags, "--out", tmp_path / "run",
                            cwd=tmp_path, timeout=60)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and words in result.stderr, result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()  # nothing created
