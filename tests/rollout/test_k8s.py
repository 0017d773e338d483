"""`gonogo canary --emit-k8s`: Flagger and Argo Rollouts manifests carry the local thresholds."""

from __future__ import annotations

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
