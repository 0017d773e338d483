"""Every stage kind of the built-in plans, run under a degraded condition: its built-in gates say NO-GO.

Each test takes one stage of a built-in plan file as it is (kind, settings, gates: read from the
plan, never copied here), changes only what makes it small or points it at the degraded thing,
and runs it through the real runner (``run_plan``) into a run directory; the verdict comes from
summary.json as for any run. Where a real fault would take minutes, the fault enters at a process
boundary: a stub HTTP server, an NVML that raises, a torchrun whose workers report a slow or
diverged run. The eval stage's gates are tested with the eval code (tests/eval).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from gonogo.plan import load_plan, resolve_plan_path
from gonogo.runner import run_plan
from gonogo.rundir import RunDir
from tests.stub_openai import stub_server

BUILT_IN_KINDS = {stage.kind.name for name in ("laptop", "quick", "gpu-node")
                  for stage in load_plan(resolve_plan_path(name)).stages}


def run_degraded(tmp_path: Path, plan_name: str, stage_name: str, **changes: Any) -> dict[str, Any]:
    """Run one stage of a built-in plan, with ``changes`` to its settings, as a one-stage plan."""
    built_in = load_plan(resolve_plan_path(plan_name)).stage(stage_name)
    raw = {**built_in.raw, **changes}
    assert raw["gates"] == [gate.text for gate in built_in.gates] and raw["gates"], "the built-in gates, as they are"
    path = tmp_path / "plan.toml"
    path.write_text(tomli_w.dumps({"plan": {"name": f"degraded-{stage_name}"}, "stage": [raw]}), encoding="utf-8")
    run_dir = RunDir.create(tmp_path / "run", f"degraded-{stage_name}")
    outcome = run_plan(load_plan(path), run_dir)
    summary = json.loads((run_dir.root / "summary.json").read_text())
    assert outcome.verdict == summary["verdict"] == "NO-GO", summary["reasons"]
    assert outcome.exit_code == 1
    assert len(summary["gates"]) == len(built_in.gates)
    return summary


def gate(summary: dict[str, Any], metric: str) -> dict[str, Any]:
    return next(entry for entry in summary["gates"] if entry["metric"] == metric)


def test_every_built_in_stage_kind_has_a_degraded_test():
    tested = {"doctor", "collectives", "train", "drill", "scale", "finetune", "quantize", "serve", "loadtest",
              "canary", "capacity", "soak", "autoscale",
              "eval"}  # eval: tests/eval (its gates belong to the eval stage's verifier and scaling work)
    assert BUILT_IN_KINDS <= tested, BUILT_IN_KINDS - tested


# -- doctor: an NVML that raises on a node whose PCI bus lists GPUs -------------------------------

@pytest.mark.parametrize("plan_name", ["gpu-node", "laptop"])
def test_doctor_with_an_nvml_that_raises_is_no_go(tmp_path, monkeypatch, plan_name):
    from gonogo.cluster import gpu_health
    from tests.cluster.test_doctor import FakeNVML

    real_probe = gpu_health.probe_gpus
    monkeypatch.setattr(gpu_health, "nvidia_pci_devices", lambda root=None: 8)
    monkeypatch.setattr(gpu_health, "probe_gpus", lambda nvml=None: real_probe(FakeNVML([], init_error=9)))
    summary = run_degraded(tmp_path, plan_name, "doctor", storage_size_MB=2)
    healthy = gate(summary, "healthy")
    assert not healthy["passed"] and healthy["measured"] is None
    assert healthy["reason"].startswith("not measured: GPU health unknown: NVML not available: Driver Not Loaded")
    if plan_name == "gpu-node":
        for metric in ("ecc_errors", "gpu_count", "nvlink_links_down"):
            assert gate(summary, metric)["reason"].startswith("not measured"), metric
    html = (Path(summary["run_dir"]) / "report.html").read_text()
    assert "Driver Not Loaded" in html


# -- collectives: a rank whose results are wrong ----------------------------------------------------

def test_collectives_that_return_wrong_data_are_no_go(tmp_path, monkeypatch):
    monkeypatch.setenv("GONOGO_INJECT_WRONG", "1")
    summary = run_degraded(tmp_path, "laptop", "collectives", min_bytes="1K", max_bytes="4K", iters=1, warmup=0,
                           ops=["all_reduce"])
    wrong = gate(summary, "wrong_total")
    assert not wrong["passed"] and wrong["measured"] >= 1


# -- train, finetune, scale: degraded worker results at the torchrun boundary -----------------------

def _fake_launch(result: dict[str, Any]):
    def launch(config, config_filename, nproc, **kwargs):
        return dict(result)
    return launch


def test_pretraining_with_a_slow_rank_and_a_lost_checkpoint_is_no_go(tmp_path, monkeypatch):
    from gonogo.stages.train import stage as train_stage

    # what rank 0 reports when a straggling rank held every step back and the restart after the
    # stop found no committed checkpoint (it started over from step 0) and the loss stayed high
    monkeypatch.setattr(train_stage, "launch", _fake_launch({
        "val_loss": 2.7, "final_loss": 2.8, "steps_completed": 300, "steps": 300, "restarts": 1,
        "resumed_from_step": 0, "mfu": 0.003, "tokens_per_second": 150.0}))
    summary = run_degraded(tmp_path, "laptop", "pretrain")
    assert [(g["metric"], g["passed"]) for g in summary["gates"]] == [
        ("val_loss", False), ("steps_completed", True), ("stopped_and_resumed", False), ("mfu", False)]


def test_a_finetune_that_got_worse_is_no_go(tmp_path, monkeypatch):
    from gonogo.stages.train import stage as train_stage
    from tests.infer.conftest import tiny_model, write_checkpoint

    checkpoint = write_checkpoint(tmp_path / "pretrained" / "step-00000010", tiny_model())
    monkeypatch.setattr(train_stage, "launch", _fake_launch({
        "val_loss": 3.9, "final_loss": 3.7, "steps": 400, "steps_completed": 400, "tokens_per_second": 900.0}))
    summary = run_degraded(tmp_path, "laptop", "finetune", checkpoint=str(checkpoint))
    loss = gate(summary, "val_loss")
    assert not loss["passed"] and loss["measured"] == 3.9


def test_scaling_with_a_slow_rank_is_no_go(tmp_path, monkeypatch):
    import gonogo.stages.scale.stage as scale

    def run_distributed(config, spec, root, threads, settings, ctx):
        # a slow rank: two processes together move 0.4x what one moves alone
        run_root = root / spec.label
        run_root.mkdir(parents=True)
        tokens = 1000.0 if spec.nproc == 1 else 400.0
        lines = []
        for step in (5, 10, 15):
            lines.append({"rank": 0, "step": step, "step_time_s": 1.0, "tokens_per_second": tokens})
            for rank in range(spec.nproc):
                lines.append({"rank": rank, "step": step, "step_time_s_rank": 1.0 + 1.5 * rank})
        (run_root / "events.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        return run_root

    monkeypatch.setattr(scale, "run_distributed", run_distributed)
    summary = run_degraded(tmp_path, "laptop", "scale")
    assert not gate(summary, "strong_scaling_efficiency")["passed"]
    assert gate(summary, "strong_scaling_efficiency")["measured"] == pytest.approx(0.2)


# -- drill: a killed rank that is not restarted ------------------------------------------------------

def test_a_kill_drill_that_does_not_recover_is_no_go(tmp_path, monkeypatch):
    """torchrun without restarts: the killed rank's peers fail and the job ends (what a real run
    with train.max_restarts=0 reports, measured 27 s per run here: too slow for the suite)."""
    from gonogo.errors import StageFailed
    from gonogo.stages.train import stage as train_stage

    def launch(config, config_filename, nproc, *, run_dir, stage, stage_dir, env=None, **kwargs):
        if env and "GONOGO_FAULT" in env:
            fault = json.loads(env["GONOGO_FAULT"])
            run_dir.event("train", event="fault_injected", rank=fault["rank"], step=fault["step"])
            raise StageFailed("train: training workers exited with code 1; [rank0]: RuntimeError: "
                              "Connection reset by peer (no restart: max_restarts=0)")
        return {"steps_completed": config.train.steps, "val_loss": 4.0}

    monkeypatch.setattr(train_stage, "launch", launch)
    summary = run_degraded(tmp_path, "laptop", "drills", kinds=["kill"], steps=6, checkpoint_every=2)
    recovered = gate(summary, "recovered")
    assert not recovered["passed"] and recovered["measured"] is False


# -- quantize: a quantized model that got worse -------------------------------------------------------

def test_a_quantized_model_that_got_worse_is_no_go(tmp_path, monkeypatch):
    import torch

    from gonogo.checkpoints import quantized as quantize
    from tests.infer.conftest import tiny_model, write_checkpoint

    checkpoint = write_checkpoint(tmp_path / "model" / "step-00000010", tiny_model())
    real = quantize.load_quantized

    def broken(path):  # a quantizer that scrambles what it wrote
        decoder, config, meta = real(path)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in decoder.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
        return decoder, config, meta

    monkeypatch.setattr(quantize, "load_quantized", broken)
    summary = run_degraded(tmp_path, "laptop", "quantize", checkpoint=str(checkpoint), eval_problems=1,
                           max_new_tokens=4, val_batches=1)
    delta = gate(summary, "val_loss_delta")
    assert not delta["passed"] and delta["measured"] > 0.05


# -- serve: a corrupt checkpoint ----------------------------------------------------------------------

def test_serving_a_corrupt_checkpoint_is_no_go(tmp_path):
    from tests.infer.conftest import tiny_model, write_checkpoint

    checkpoint = write_checkpoint(tmp_path / "model" / "step-00000010", tiny_model())
    for file in checkpoint.rglob("*"):
        if file.is_file() and file.stat().st_size > 4096:
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 3])  # truncated weights
    summary = run_degraded(tmp_path, "laptop", "serve", checkpoint=str(checkpoint), startup_timeout_s=120)
    assert [g["reason"] for g in summary["gates"]] == ["not measured", "not measured"]
    assert summary["stages"][0]["status"] == "failed"


def test_the_serve_health_checks_fail_against_a_server_whose_requests_fail():
    import httpx

    from gonogo.stages.serve.stage import health_checks

    with stub_server("fail") as url, httpx.Client(timeout=10) as client:
        checks, first_ms, streamed, plain = health_checks(client, url, "gonogo")
    assert checks["/health answers ok"] and checks["/v1/models lists the model"]
    assert not checks["a chat completion answers 200 with text"]
    assert not checks["a streamed chat completion ends with [DONE]"]
    assert first_ms is None and streamed is None and plain is None
    with stub_server("ok") as url, httpx.Client(timeout=10) as client:
        checks, first_ms, streamed, plain = health_checks(client, url, "gonogo")
    assert all(checks.values()) and streamed.strip() == plain


# -- loadtest: a server that fails every request ------------------------------------------------------

@pytest.mark.parametrize("plan_name", ["laptop", "gpu-node"])
def test_a_load_test_against_a_server_that_fails_every_request_is_no_go(tmp_path, plan_name):
    with stub_server("fail") as url:
        summary = run_degraded(tmp_path, plan_name, "loadtest", url=url, num_requests=6, rate=50, warmup=0)
    for entry in summary["gates"]:
        assert not entry["passed"], entry
        if entry["metric"] != "success_rate":
            assert entry["measured"] is None
            assert entry["reason"] == "not measured: no request completed (6 of 6 failed)"
    assert gate(summary, "success_rate")["measured"] == 0.0


def test_latency_assumptions_stay_untested_when_no_request_completed(tmp_path):
    from gonogo.plan import load_plan as load

    with stub_server("fail") as url:
        built_in = load(resolve_plan_path("laptop"))
        raw = {**built_in.stage("loadtest").raw, "url": url, "num_requests": 3, "rate": 50, "warmup": 0}
        path = tmp_path / "plan.toml"
        latency = {key: built_in.raw["assumptions"][key] for key in ("ttft_p95_ms", "e2el_p99_ms")}
        path.write_text(tomli_w.dumps({"plan": {"name": "latency"}, "stage": [raw], "assumptions": latency}),
                        encoding="utf-8")
        run_dir = RunDir.create(tmp_path / "run", "latency")
        run_plan(load(path), run_dir)
    summary = json.loads((run_dir.root / "summary.json").read_text())
    register = {a["key"]: a for a in summary["assumptions"]}
    for key in ("ttft_p95_ms", "e2el_p99_ms"):
        assert register[key]["status"] == "untested" and "no request completed" in register[key]["reason"]


# -- canary: a canary whose requests all fail ------------------------------------------------------

@pytest.mark.timeout(300)
def test_a_canary_whose_requests_fail_is_no_go(tmp_path):
    with stub_server("ok") as stable, stub_server("fail") as canary:
        summary = run_degraded(tmp_path, "laptop", "canary", stable=stable, canary=canary)
    promoted = gate(summary, "promoted")
    assert not promoted["passed"] and promoted["measured"] is False


# -- capacity: half the GPUs ---------------------------------------------------------------------------

def test_capacity_with_half_the_gpus_is_no_go(tmp_path):
    summary = run_degraded(tmp_path, "laptop", "capacity-405b", gpus=8192)
    days = gate(summary, "time_to_train_days")
    assert not days["passed"] and days["measured"] > 120


# -- soak: a checkpoint store slowed on purpose after the first window ------------------------------

def test_soak_with_a_slowed_checkpoint_store_is_no_go(tmp_path):
    summary = run_degraded(tmp_path, "laptop", "soak", duration_s=15, window_s=5, checkpoint_every_s=1,
                           probe_every_s=5, probe_tokens=4096, slow_store_s=2)
    drift = gate(summary, "checkpoint_drift_max")
    assert not drift["passed"] and drift["measured"] > 2.0


# -- autoscale: a fleet that cannot grow (max_replicas = min_replicas) -------------------------------

def test_autoscale_with_a_fleet_that_cannot_grow_is_no_go(tmp_path):
    built_in = load_plan(resolve_plan_path("ops")).stage("autoscale").raw["autoscale"]
    summary = run_degraded(tmp_path, "ops", "autoscale", autoscale={**built_in, "max_replicas": 1},
                           low_s=2, high_max_s=8, down_max_s=5)
    scaled_up, seen = gate(summary, "scaled_up"), gate(summary, "max_replicas_seen")
    assert not scaled_up["passed"] and scaled_up["measured"] is False  # measured, not a stage that broke
    assert not seen["passed"] and seen["measured"] == 1
