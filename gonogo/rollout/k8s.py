"""The same rollout for Kubernetes: a Flagger ``Canary`` and an Argo Rollouts ``Rollout`` +
``AnalysisTemplate``, with the thresholds of the local run, so a canary that passes here maps
one-to-one onto the cluster.

Mapping (local → cluster):

    steps, interval, threshold   → Flagger analysis.stepWeights / interval / threshold;
                                   Argo setWeight + pause steps, failureLimit = threshold − 1
    success_rate (0..1)          → Flagger request-success-rate (percent); Argo Prometheus query
    e2el_p99_ms                  → Flagger request-duration (p99, ms); Argo Prometheus query
    ttft_p99_ms, latency_ratio   → Prometheus queries over the server's own histograms
                                   (gonogo_time_to_first_token_seconds, gonogo_e2e_request_latency_seconds)
    accuracy, accuracy_drop      → a command: ``python -m gonogo.rollout.analysis`` against the canary
                                   and primary services (a Flagger loadtester ``cmd`` rollout webhook;
                                   an Argo Job metric)
    steady load                  → ``gonogo loadtest`` against the canary service during each interval
    webhooks                     → Flagger webhooks of the same names

The Deployment both target (deployment.yaml) runs the canary side's engine: the rollout moves
traffic onto that pod template. With ``canary_engine = "vllm"`` it is vLLM's OpenAI server image
with its arguments (an engine migration when the stable side ran gonogo), and the latency queries
of each side read that engine's own histograms (``vllm:...`` or ``gonogo_...``).

Differences worth knowing: Flagger counts failed checks across metrics like the local controller;
Argo's failureLimit is per metric. The Prometheus queries assume pod labels are exported
(``pod``, and ``rollouts_pod_template_hash`` for Argo), as kube-prometheus does.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from gonogo.infer.engines.start import serve_arguments
from gonogo.names import check_dns_label, check_pattern

PORT = 8000
MODEL_PATH = "/models/model"
# (time to first token, end-to-end latency) histograms each engine exports on /metrics
HISTOGRAMS = {"gonogo": ("gonogo_time_to_first_token_seconds", "gonogo_e2e_request_latency_seconds"),
              "vllm": ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds")}


def _histograms(engine) -> tuple[str, str]:
    # a command engine's metric names are unknown: gonogo's names are the documented default
    return HISTOGRAMS.get(engine.name, HISTOGRAMS["gonogo"])


def container(engine, *, name: str, model_name: str) -> dict[str, Any]:
    """The serving container for ``engine``: image and arguments, port PORT, model under /models."""
    from gonogo.errors import UserError

    image = engine.container_image
    if image is None:
        raise UserError(f'engine {engine.label}: set image = "..." to emit Kubernetes manifests for it')
    if engine.name == "vllm":
        args = ["--model", MODEL_PATH, "--served-model-name", model_name, "--host", "0.0.0.0", "--port", str(PORT)]
        if engine.dtype:
            args += ["--dtype", engine.dtype]
        if engine.max_model_len:
            args += ["--max-model-len", str(engine.max_model_len)]
        spec: dict[str, Any] = {"args": args + list(engine.args)}
    elif engine.name == "gonogo":
        spec = {"command": ["gonogo", "serve"],
                "args": serve_arguments(MODEL_PATH, host="0.0.0.0", port=PORT, model_name=model_name)}
    else:
        fields = {"model": MODEL_PATH, "port": str(PORT), "host": "0.0.0.0", "model_name": model_name}
        spec = {"command": [part.format(**fields) for part in engine.command]}
    return {"name": name, "image": image, **spec, "ports": [{"name": "http", "containerPort": PORT}],
            "readinessProbe": {"httpGet": {"path": engine.health_path or "/health", "port": PORT}},
            "volumeMounts": [{"name": "models", "mountPath": "/models"}]}


def deployment_manifest(settings, *, name: str, namespace: str) -> dict[str, Any]:
    """The Deployment that Flagger's targetRef and Argo's workloadRef name, running the canary's engine."""
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": {
            "gonogo/stable-engine": settings.stable_engine.label,
            "gonogo/canary-engine": settings.canary_engine.label}},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"containers": [container(settings.canary_engine, name="server", model_name=settings.model_name)],
                     "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": f"{name}-models"}}]}}},
    }


def _seconds(value: float) -> str:
    return f"{max(int(round(value)), 1)}s"


def _quality_command(settings, canary_url: str, stable_url: str) -> str:
    analysis = settings.analysis
    t = analysis.thresholds
    parts = ["python", "-m", "gonogo.rollout.analysis", "--canary", canary_url, "--stable", stable_url,
             "--prompts", str(analysis.quality_prompts), "--seed", str(analysis.quality_seed),
             "--max-tokens", str(analysis.quality_max_tokens), "--model", settings.model_name]
    if t.accuracy is not None:
        parts += ["--min-accuracy", f"{t.accuracy:g}"]
    if t.accuracy_drop is not None:
        parts += ["--max-accuracy-drop", f"{t.accuracy_drop:g}"]
    return shlex.join(parts)  # run by `sh -c` (Flagger's loadtester, the Argo job): quote every word


def _load_command(settings, url: str) -> str:
    load = settings.load
    # each run of the webhook gets a new run directory from mktemp (the loadtester's working
    # directory may be read-only, and `gonogo loadtest` never writes into an existing run)
    return shlex.join(["gonogo", "loadtest", "--url", url, "--rate", f"{load.rate:g}", "--max-concurrency",
                       str(load.concurrency), "--duration", f"{settings.analysis.interval_s:g}",
                       "--out"]) + ' "$(mktemp -d)"'


def check_inputs(settings, *, name: str, namespace: str) -> None:
    """UserError for a name, namespace or webhook URL that cannot go into the manifests as is."""
    check_dns_label(name, "--name")
    check_dns_label(namespace, "namespace")
    hooks = settings.webhooks
    for what, url in (("pre_rollout", hooks.pre_rollout), ("confirm_promotion", hooks.confirm_promotion),
                      ("rollback", hooks.rollback)):
        if url:
            check_pattern(url, r"https?://[^\s\"'`$\\]+", f"webhook {what}",
                          "an http(s):// URL without spaces, quotes, '$', '`' or '\\'")


def _histogram_p99(metric: str, selector: str, window: str) -> str:
    return (f"histogram_quantile(0.99, sum(rate({metric}_bucket{{{selector}}}[{window}])) by (le)) * 1000")


def flagger_manifests(settings, *, name: str, namespace: str) -> list[dict[str, Any]]:
    analysis = settings.analysis
    t = analysis.thresholds
    interval = _seconds(analysis.interval_s)
    canary_pods = 'namespace="{{ namespace }}",pod=~"{{ target }}-[0-9a-zA-Z]+(-[0-9a-zA-Z]+)"'
    primary_pods = 'namespace="{{ namespace }}",pod=~"{{ target }}-primary-[0-9a-zA-Z]+(-[0-9a-zA-Z]+)"'
    templates: list[dict[str, Any]] = []
    metrics: list[dict[str, Any]] = []
    if t.success_rate is not None:
        metrics.append({"name": "request-success-rate", "interval": interval,
                        "thresholdRange": {"min": round(100 * t.success_rate, 4)}})
    if t.e2el_p99_ms is not None:
        metrics.append({"name": "request-duration", "interval": interval, "thresholdRange": {"max": t.e2el_p99_ms}})

    def template(metric_name: str, query: str, bound: dict[str, float]) -> None:
        templates.append({"apiVersion": "flagger.app/v1beta1", "kind": "MetricTemplate",
                          "metadata": {"name": f"{name}-{metric_name}", "namespace": namespace},
                          "spec": {"provider": {"type": "prometheus", "address": "http://prometheus.monitoring:9090"},
                                   "query": query}})
        metrics.append({"name": metric_name, "interval": interval, "thresholdRange": bound,
                        "templateRef": {"name": f"{name}-{metric_name}", "namespace": namespace}})

    canary_ttft, canary_e2el = _histograms(settings.canary_engine)
    stable_e2el = _histograms(settings.stable_engine)[1]
    if t.ttft_p99_ms is not None:
        template("ttft-p99", _histogram_p99(canary_ttft, canary_pods, "{{ interval }}"), {"max": t.ttft_p99_ms})
    if t.latency_ratio is not None:
        canary_p99 = _histogram_p99(canary_e2el, canary_pods, "{{ interval }}")
        primary = _histogram_p99(stable_e2el, primary_pods, "{{ interval }}")
        template("latency-ratio", f"({canary_p99}) / ({primary})", {"max": t.latency_ratio})
    loadtester = f"http://flagger-loadtester.{namespace}/"
    canary_url = f"http://{name}-canary.{namespace}:{PORT}"
    primary_url = f"http://{name}-primary.{namespace}:{PORT}"
    webhooks: list[dict[str, Any]] = []
    hooks = settings.webhooks
    if hooks.pre_rollout:
        webhooks.append({"name": "pre-rollout", "type": "pre-rollout", "url": hooks.pre_rollout,
                         "timeout": _seconds(hooks.timeout_s)})
    webhooks.append({"name": "load", "type": "rollout", "url": loadtester, "timeout": _seconds(analysis.interval_s + 30),
                     "metadata": {"type": "cmd", "cmd": _load_command(settings, canary_url)}})
    if t.needs_quality:
        webhooks.append({"name": "quality", "type": "rollout", "url": loadtester, "timeout": "120s",
                         "metadata": {"type": "cmd", "cmd": _quality_command(settings, canary_url, primary_url)}})
    if hooks.confirm_promotion:
        webhooks.append({"name": "confirm-promotion", "type": "confirm-promotion", "url": hooks.confirm_promotion,
                         "timeout": _seconds(hooks.timeout_s)})
    if hooks.rollback:
        webhooks.append({"name": "rollback", "type": "rollback", "url": hooks.rollback,
                         "timeout": _seconds(hooks.timeout_s)})
    canary = {
        "apiVersion": "flagger.app/v1beta1",
        "kind": "Canary",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "service": {"port": PORT, "targetPort": PORT},
            "analysis": {"interval": interval, "threshold": analysis.threshold,
                         "stepWeights": list(analysis.steps), "metrics": metrics, "webhooks": webhooks},
        },
    }
    return templates + [canary]


def argo_manifests(settings, *, name: str, namespace: str) -> list[dict[str, Any]]:
    analysis = settings.analysis
    t = analysis.thresholds
    interval = _seconds(analysis.interval_s)
    failure_limit = analysis.threshold - 1   # Argo fails when failures exceed the limit
    prometheus = {"address": "http://prometheus.monitoring:9090"}
    canary_pods = 'namespace="{{args.namespace}}",rollouts_pod_template_hash="{{args.canary-hash}}"'
    stable_pods = 'namespace="{{args.namespace}}",rollouts_pod_template_hash="{{args.stable-hash}}"'
    metrics: list[dict[str, Any]] = []

    def prometheus_metric(metric_name: str, query: str, condition: str) -> None:
        metrics.append({"name": metric_name, "interval": interval, "failureLimit": failure_limit,
                        "successCondition": condition,
                        "provider": {"prometheus": {**prometheus, "query": query}}})

    if t.success_rate is not None:
        prometheus_metric("success-rate",
                          f'sum(rate(gonogo_requests{{{canary_pods},status!~"5.."}}[{interval}])) / '
                          f'sum(rate(gonogo_requests{{{canary_pods}}}[{interval}]))',
                          f"result[0] >= {t.success_rate:g}")
    canary_ttft, canary_e2el = _histograms(settings.canary_engine)
    stable_e2el = _histograms(settings.stable_engine)[1]
    if t.e2el_p99_ms is not None:
        prometheus_metric("e2el-p99", _histogram_p99(canary_e2el, canary_pods, interval),
                          f"result[0] <= {t.e2el_p99_ms:g}")
    if t.ttft_p99_ms is not None:
        prometheus_metric("ttft-p99", _histogram_p99(canary_ttft, canary_pods, interval),
                          f"result[0] <= {t.ttft_p99_ms:g}")
    if t.latency_ratio is not None:
        canary = _histogram_p99(canary_e2el, canary_pods, interval)
        stable = _histogram_p99(stable_e2el, stable_pods, interval)
        prometheus_metric("latency-ratio", f"({canary}) / ({stable})", f"result[0] <= {t.latency_ratio:g}")
    if t.needs_quality:
        command = _quality_command(settings, f"http://{name}-canary.{namespace}:{PORT}",
                                   f"http://{name}-stable.{namespace}:{PORT}")
        metrics.append({"name": "quality", "interval": interval, "failureLimit": failure_limit, "provider": {"job": {
            "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [
                {"name": "quality", "image": "gonogo:latest", "command": ["sh", "-c", command]}]}}}}}})
    template = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "AnalysisTemplate",
        "metadata": {"name": f"{name}-canary", "namespace": namespace},
        "spec": {"args": [{"name": "namespace"}, {"name": "canary-hash"}, {"name": "stable-hash"}],
                 "metrics": metrics},
    }
    steps: list[dict[str, Any]] = []
    for weight in analysis.steps:
        steps += [{"setWeight": weight}, {"pause": {"duration": interval}}]
    rollout = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Rollout",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "workloadRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "strategy": {"canary": {
                "canaryService": f"{name}-canary",
                "stableService": f"{name}-stable",
                "analysis": {"templates": [{"templateName": f"{name}-canary"}], "startingStep": 1, "args": [
                    {"name": "namespace", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "canary-hash", "valueFrom": {"podTemplateHashValue": "Latest"}},
                    {"name": "stable-hash", "valueFrom": {"podTemplateHashValue": "Stable"}}]},
                "steps": steps,
            }},
        },
    }
    return [template, rollout]


def write_k8s(directory: Path, settings, *, name: str = "gonogo", namespace: str = "default") -> list[Path]:
    """Write flagger-canary.yaml, argo-rollout.yaml and the deployment.yaml they target under
    ``directory``; returns their paths."""
    import yaml

    check_inputs(settings, name=name, namespace=namespace)
    directory = Path(directory)
    from gonogo.files import check_output_dir, write_atomic

    check_output_dir(directory, "--emit-k8s")
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, documents in (("flagger-canary.yaml", flagger_manifests(settings, name=name, namespace=namespace)),
                                 ("argo-rollout.yaml", argo_manifests(settings, name=name, namespace=namespace)),
                                 ("deployment.yaml", [deployment_manifest(settings, name=name, namespace=namespace)])):
        path = directory / file_name
        write_atomic(path, yaml.safe_dump_all(documents, sort_keys=False))
        written.append(path)
    return written
