"""End to end with real vLLM: an engine-migration canary (gonogo -> vLLM on one checkpoint).

One vLLM start serves the whole module (it takes a minute or two on 2 busy cores): the canary
stage's own start path (`canary_engine = "vllm"`: export, vLLM's OpenAI server from its venv,
readiness wait) brings up both sides, then the real `openai` client streams a chat from vLLM,
`gonogo loadtest` measures it, a rollout from gonogo to vLLM promotes with no client error and
the quality check answered by vLLM, and a rollout onto a crashed vLLM rolls back.

vLLM is installed by `gonogo engine install vllm` (.ci/run runs it). Where it is not installed
the module is skipped, except in CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from types import SimpleNamespace

import pytest

from gonogo.rollout.controller import Side

QUALITY_PROMPTS = 4  # the quality_checkpoint fixture memorised this many held-out problems


@pytest.fixture(scope="module")
def vllm_quality_checkpoint(tmp_path_factory):
    """The memorising model with 32-wide heads: vLLM's CPU attention has no kernel for 16. At this
    shape a lower learning rate memorises the problems reliably (measured: 4 of 4)."""
    from gonogo.data.synthetic import generate
    from gonogo.model.shape import ModelConfig

    from .conftest import train_memorising_checkpoint

    config = ModelConfig(d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=128, max_seq_len=128)
    return train_memorising_checkpoint(tmp_path_factory.mktemp("vllm-canary") / "step-00000400",
                                       generate("heldout", 0, QUALITY_PROMPTS), steps=400, config=config, lr=5e-3)


@pytest.fixture(scope="module")
def sides(vllm_quality_checkpoint, tmp_path_factory):
    from gonogo.infer.engines.install import engine_status
    from gonogo.rollout.analysis import Analysis
    from gonogo.stages.canary.stage import CanarySettings, Load, open_sides

    status = engine_status("vllm")
    if not status["ready"]:
        message = f"the vLLM engine is not ready ({status['reason']}); run `gonogo engine install vllm`"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    directory = tmp_path_factory.mktemp("engines")
    # same weights on both sides, both in fp32: greedy answers agree, so the quality check must pass
    analysis = Analysis(steps=[50, 100], interval_s=2.0, threshold=1, quality_prompts=QUALITY_PROMPTS,
                        quality_max_tokens=96, ratio_floor_ms=500.0,
                        thresholds={"success_rate": 0.99, "accuracy_drop": 0.25})
    # --enforce-eager: no inductor compile, which on 2 busy cores costs more start time than it saves
    canary_engine = {"name": "vllm", "dtype": "float32", "args": ["--enforce-eager"]}
    settings = CanarySettings(stable=str(vllm_quality_checkpoint), canary=str(vllm_quality_checkpoint),
                              stable_engine="gonogo", canary_engine=canary_engine,
                              analysis=analysis, load=Load(rate=3.0, concurrency=3, max_tokens=8),
                              startup_timeout_s=600.0, drain_timeout_s=20.0)
    started = time.monotonic()
    stable, canary = open_sides(settings, directory)
    startup_seconds = time.monotonic() - started
    print(f"\nstable (gonogo) and canary (vLLM) ready in {startup_seconds:.1f} s")
    try:
        # the rollouts below must not stop the shared servers; the fixture does
        yield SimpleNamespace(settings=settings, directory=directory, startup_seconds=startup_seconds,
                              stable=dataclasses.replace(stable, stop=None),
                              canary=dataclasses.replace(canary, stop=None))
    finally:
        stable.stop()
        canary.stop()


def test_vllm_serves_the_export_and_streams_a_chat_to_the_openai_client(sides):
    from openai import OpenAI

    assert sides.canary.model == "gonogo"
    assert (sides.directory / "canary-server" / "hf-export" / "config.json").is_file()  # exported for vLLM
    assert (sides.directory / "canary-server.log").stat().st_size > 0                  # its log, kept
    client = OpenAI(base_url=f"{sides.canary.url}/v1", api_key="unused", max_retries=0, timeout=60)
    stream = client.chat.completions.create(model="gonogo", messages=[{"role": "user", "content": "12+34="}],
                                            max_tokens=16, temperature=0, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len(pieces) >= 2 and "".join(pieces)


def test_gonogo_loadtest_measures_vllm(sides, tmp_path):
    from gonogo.cli import main

    out = tmp_path / "load.json"
    code = main(["loadtest", "--url", sides.canary.url, "--num-requests", "8", "--rate", "8", "--max-tokens", "8",
                 "--json", str(out), "--out", str(tmp_path / "run")])
    assert code == 0
    assert (tmp_path / "run" / "stages" / "loadtest" / "metrics.json").is_file()
    result = json.loads(out.read_text())
    assert result["completed"] == 8 and result["failed"] == 0
    assert result["p95_ttft_ms"] > 0 and result["output_throughput"] > 0


def test_a_gonogo_to_vllm_canary_promotes_with_no_client_errors(sides, tmp_path):
    from gonogo.stages.canary.stage import run_rollout

    metrics = run_rollout(sides.stable, sides.canary, sides.settings, tmp_path, name="migration")
    timeline = json.loads((tmp_path / "timeline.json").read_text())
    assert metrics["promoted"] and not metrics["rolled_back"], timeline["reason"]
    assert metrics["client_errors"] == 0 and metrics["client_requests"] > 0
    # the quality check ran against vLLM's answers: the memorised problems, all right on stable
    assert timeline["stable_accuracy"] == 1.0
    assert all(interval["accuracy"] is not None and interval["accuracy"] >= 0.75
               for interval in timeline["intervals"])


def test_a_crashed_vllm_canary_is_rolled_back(sides, tmp_path):
    from gonogo.stages.canary.stage import run_rollout

    # the engine dies (the whole process group, as an OOM kill would take it): the router keeps
    # clients on stable where it can and the analysis sees the canary fail
    record = json.loads((sides.directory / "canary-server.json").read_text())
    assert record["engine"] == "vllm"
    vllm_pid = record["pid"]
    os.killpg(vllm_pid, signal.SIGKILL)
    canary = Side(url=sides.canary.url, model=sides.canary.model)
    metrics = run_rollout(sides.stable, canary, sides.settings, tmp_path, name="broken")
    assert metrics["rolled_back"] and not metrics["promoted"], metrics
    assert metrics["client_errors_router"] == 0 and metrics["client_errors_stable"] == 0, metrics
