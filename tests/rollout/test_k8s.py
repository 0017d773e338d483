"""`gonogo canary --emit-k8s`: Flagger and Argo Rollouts manifests carry the local thresholds."""

from __future__ import annotations

import pytest
import yaml

from gonogo.cli import main


def test_emit_k8s_maps_the_thresholds_one_to_one(tmp_path):
    code = main(["canary", "--emit-k8s", str(tmp_path), "--name", "llm", "--steps", "10,25,50,100",
                 "--interval", "30", "--threshold", "3", "--min-success-rate", "0.995",
                 "--max-e2el-p99-ms", "800", "--max-ttft-p99-ms", "200", "--max-latency-ratio", "1.5",
                 "--max-accuracy-drop", "0.05", "--webhook-confirm-promotion", "http://gate.example/ok"])
    assert code == 0
    flagger = list(yaml.safe_load_all((tmp_path / "flagger-canary.yaml").read_text()))
    canary = next(doc for doc in flagger if doc["kind"] == "Canary")
    analysis = canary["spec"]["analysis"]
    assert analysis["stepWeights"] == [10, 25, 50, 100]
    assert analysis["interval"] == "30s" and analysis["threshold"] == 3
    metrics = {m["name"]: m["thresholdRange"] for m in analysis["metrics"]}
    assert metrics["request-success-rate"] == {"min": 99.5}
    assert metrics["request-duration"] == {"max": 800}
    assert metrics["ttft-p99"] == {"max": 200} and metrics["latency-ratio"] == {"max": 1.5}
    templates = {doc["metadata"]["name"] for doc in flagger if doc["kind"] == "MetricTemplate"}
    assert templates == {"llm-ttft-p99", "llm-latency-ratio"}
    hooks = {h["name"]: h for h in analysis["webhooks"]}
    assert "--max-accuracy-drop 0.05" in hooks["quality"]["metadata"]["cmd"]
    assert hooks["confirm-promotion"]["url"] == "http://gate.example/ok"

    template, rollout = yaml.safe_load_all((tmp_path / "argo-rollout.yaml").read_text())
    assert template["kind"] == "AnalysisTemplate" and rollout["kind"] == "Rollout"
    weights = [s["setWeight"] for s in rollout["spec"]["strategy"]["canary"]["steps"] if "setWeight" in s]
    assert weights == [10, 25, 50, 100]
    argo = {m["name"]: m for m in template["spec"]["metrics"]}
    assert set(argo) == {"success-rate", "e2el-p99", "ttft-p99", "latency-ratio", "quality"}
    assert all(m["failureLimit"] == 2 for m in argo.values())
    assert argo["success-rate"]["successCondition"] == "result[0] >= 0.995"


def test_hostile_strings_reach_the_manifests_quoted_or_are_refused(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    import pytest

    from gonogo.errors import UserError
    from gonogo.rollout.k8s import write_k8s
    from gonogo.stages.canary.stage import CanarySettings

    hostile = 'm"; touch PWNED; echo "$(touch PWNED)`touch PWNED`'
    settings = CanarySettings(stable="a", canary="b", model_name=hostile,
                              analysis={"thresholds": {"accuracy_drop": 0.05}})
    write_k8s(tmp_path / "k8s", settings, name="llm")
    canary = next(doc for doc in yaml.safe_load_all((tmp_path / "k8s" / "flagger-canary.yaml").read_text())
                  if doc["kind"] == "Canary")
    commands = [hook["metadata"]["cmd"] for hook in canary["spec"]["analysis"]["webhooks"] if "metadata" in hook]
    bin_dir, argv_file = tmp_path / "bin", tmp_path / "argv.txt"
    bin_dir.mkdir()
    for tool in ("python", "gonogo"):  # what Flagger's loadtester runs with `sh -c`, recording its words
        (bin_dir / tool).write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> {argv_file}\n')
        (bin_dir / tool).chmod(0o755)
    for command in commands:
        done = subprocess.run(["sh", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=30,
                              env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
        assert done.returncode == 0, done.stderr
    words = argv_file.read_text().splitlines()
    assert hostile in words and not list(tmp_path.rglob("PWNED"))
    # the load webhook's `gonogo loadtest` writes its run into a new temporary directory each time
    out = Path(words[words.index("loadtest") + words[words.index("loadtest"):].index("--out") + 1])
    assert out.is_dir() and not any(out.iterdir()) and out != tmp_path
    out.rmdir()

    for bad in ({"name": "llm\nx"}, {"name": "a;b"}, {"namespace": "$(id)"}):
        with pytest.raises(UserError):
            write_k8s(tmp_path / "refused", settings, **{"name": "llm", **bad})
    hooked = CanarySettings(stable="a", canary="b", webhooks={"rollback": "http://x/`id`"})
    with pytest.raises(UserError, match="webhook rollback"):
        write_k8s(tmp_path / "refused", hooked)
    assert not (tmp_path / "refused").exists()


def test_emit_k8s_names_the_vllm_image_and_arguments_for_an_engine_migration(tmp_path):
    code = main(["canary", "--emit-k8s", str(tmp_path), "--name", "llm", "--stable-engine", "gonogo",
                 "--canary-engine", "vllm", "--max-ttft-p99-ms", "200", "--max-latency-ratio", "1.5"])
    assert code == 0
    (deployment,) = yaml.safe_load_all((tmp_path / "deployment.yaml").read_text())
    assert deployment["kind"] == "Deployment" and deployment["metadata"]["name"] == "llm"
    assert deployment["metadata"]["annotations"] == {"gonogo/stable-engine": "gonogo", "gonogo/canary-engine": "vllm"}
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("vllm/vllm-openai")
    assert container["args"][:4] == ["--model", "/models/model", "--served-model-name", "gonogo"]
    assert "--port" in container["args"] and container["readinessProbe"]["httpGet"]["path"] == "/health"
    # each side's latency is read from its own engine's histograms
    flagger = list(yaml.safe_load_all((tmp_path / "flagger-canary.yaml").read_text()))
    queries = {doc["metadata"]["name"]: doc["spec"]["query"] for doc in flagger if doc["kind"] == "MetricTemplate"}
    assert "vllm:time_to_first_token_seconds" in queries["llm-ttft-p99"]
    ratio = queries["llm-latency-ratio"]
    assert "vllm:e2e_request_latency_seconds" in ratio and "gonogo_e2e_request_latency_seconds" in ratio


def test_emit_k8s_for_a_command_engine_needs_an_image(tmp_path):
    from gonogo.errors import UserError
    from gonogo.rollout.k8s import write_k8s
    from gonogo.stages.canary.stage import CanarySettings
    from gonogo.typed_config import validate

    settings = validate(CanarySettings, {"stable": "", "canary": "", "canary_engine": {
        "name": "command", "command": ["sglang", "--model-path", "{model}", "--port", "{port}"]}}, "test")
    with pytest.raises(UserError, match="set image"):
        write_k8s(tmp_path / "out", settings)
    assert not (tmp_path / "out" / "flagger-canary.yaml").exists()
    settings.canary_engine = settings.canary_engine.model_copy(update={"image": "lmsysorg/sglang:latest"})
    write_k8s(tmp_path / "out", settings)
    (deployment,) = yaml.safe_load_all((tmp_path / "out" / "deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["sglang", "--model-path", "/models/model", "--port", "8000"]
