"""Autoscaling the serving fleet: a replica pool behind one loopback router, and an autoscaler.

The pool forwards each request to the ready replica with the fewest requests in flight; a
replica takes at most ``max_concurrency`` at once and the rest wait at the router (the queue
depth; Knative's container concurrency). Every ``interval_s`` (jittered, so that periodic traffic
cannot stay in phase with the readings) the autoscaler reads one signal:

- ``concurrency``: (running + queued) requests per ready replica (Knative's KPA, KEDA's average),
  the mean of the readings over the last ``window_s`` (Knative's stable window);
- ``queue_depth``: requests waiting at the router, the mean over the last ``window_s``;
- ``ttft_p95_ms``: the p95 time to first token of the requests that ended in the last ``window_s``.

Above ``scale_up_threshold`` it starts one replica (``gonogo serve``, started like the canary
stage starts its servers) and adds it to the pool only once it answers /health (readiness). Below
``scale_down_threshold`` for ``cooldown_s`` (and ``cooldown_s`` after the last scale-up) it takes
the newest replica out of rotation, waits until its requests have drained (bounded), then stops
it. ``min_replicas``..``max_replicas`` bound both. The same thresholds are written as a KEDA
ScaledObject (Prometheus trigger on the servers' /metrics) and an HPA (autoscaling/v2).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import Field

from gonogo.stages.autoscale.pool import AutoscaleSettings, Autoscaler, Pool, Record, Replica, percentile
from gonogo.stages.base import StageKind, StageSettings
from gonogo.typed_config import Strict

SCHEMAS = Path(__file__).resolve().parents[2] / "rollout" / "schemas"


# -- the drill -----------------------------------------------------------------------------------

class DrillSettings(Strict):
    # scale before saturation (Knative's target utilisation): one request per replica at a time,
    # scale up above 0.6 concurrent requests per replica, down below 0.15 for the cool-down
    autoscale: AutoscaleSettings = Field(default_factory=lambda: AutoscaleSettings(
        max_replicas=2, scale_up_threshold=0.6, scale_down_threshold=0.15, cooldown_s=5.0, max_concurrency=1))
    low_rate: float = Field(1.0, gt=0)             # requests per second before and after the ramp
    # requests per second at the peak; default: peak_factor x one replica's capacity, measured in the
    # low phase (max_concurrency / mean service time): busy enough that one replica crosses the
    # scale-up threshold, not so busy that a CPU-bound pair on a shared machine cannot keep up
    high_rate: Optional[float] = Field(None, gt=0)
    peak_factor: float = Field(0.8, gt=0)
    recover_window_s: float = Field(3.0, gt=0)     # "p95 back under the SLO": the last seconds of the peak
    low_s: float = Field(3.0, gt=0)
    high_hold_s: float = Field(2.0, ge=0)          # the peak continues at least this long after the scale-up
    high_max_s: float = Field(60.0, gt=0)          # bound on the peak (scale-up and recovery)
    down_max_s: float = Field(60.0, gt=0)          # bound on waiting for the scale-down after the ramp
    slo_ttft_p95_ms: float = Field(1000.0, gt=0)
    # 64 new tokens a request: at 16, a request's fixed cost (HTTP through the router, the client)
    # set the peak near 40 requests/s, and the router and load generator in this process fell
    # behind on a 2-core machine (a backlog that never drained in CI); at 64 the peak is ~20/s
    max_tokens: int = Field(64, ge=1)
    checkpoint: Optional[str] = None               # the model the replicas serve (default: a tiny one)


METRICS = {"scaled_up", "scaled_down", "max_replicas_seen", "final_replicas", "time_to_scale_up_s",
           "time_to_scale_down_s", "slo_breached", "breach_to_ready_s", "ttft_p95_before_ms", "ttft_p95_peak_ms",
           "ttft_p95_after_scale_up_ms", "p95_back_under_slo", "requests", "failed_requests", "cooldown_s"}


def tiny_checkpoint(directory: Path, steps: int = 40) -> Path:
    """A 2-layer model trained for a moment on the drill's prompts: the drill measures the fleet,
    not the answers, but the model must write text (an untrained one may only emit bytes that
    decode to nothing, which the load generator rightly counts as failed responses)."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from gonogo.data.tokenizer import ByteTokenizer
    from gonogo.stages.loadtest.stage import load_prompts
    from gonogo.model.shape import ModelConfig
    from gonogo.model.decoder import Decoder
    from gonogo.checkpoints import manifest

    if (directory / "meta.json").is_file():
        return directory
    torch.manual_seed(0)
    config = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=128)
    model = Decoder(config)
    model.init_weights(0)
    tokenizer = ByteTokenizer()
    rows = [tokenizer.encode(text)[:64] for text in load_prompts("synthetic", 16, 0)]
    length = min(len(row) for row in rows)
    tokens = torch.tensor([row[:length] for row in rows], dtype=torch.long)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    (directory / "meta.json").write_text(json.dumps({"step": 0, "model": config.model_dump(), "tokenizer": "byte-v1",
                                                     "world_size": 1, "train": {}}))
    manifest.commit(directory)
    return directory


class RampLoad:
    """Open-loop streaming requests at a rate that can be changed while it runs, in a thread."""

    def __init__(self, url: str, model: str, max_tokens: int):
        self.url, self.model, self.max_tokens = url, model, max_tokens
        self.rate = 1.0
        self.results: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="ramp-load", daemon=True)

    def _keep_result(self, task: "asyncio.Task") -> None:
        if not task.cancelled():
            self.results.append(task.result())

    def start(self) -> "RampLoad":
        self._thread.start()
        return self

    def stop(self, timeout: float = 120.0) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout)

    async def _main(self) -> None:
        import httpx

        from gonogo.stages.loadtest.stage import LoadSettings, load_prompts, send_request

        # ignore_eos: every request decodes max_tokens (the drill's model is untrained and may stop at once)
        settings = LoadSettings(url=self.url, model=self.model, max_tokens=self.max_tokens, temperature=0.0,
                                request_timeout=90.0, ignore_eos=True)
        prompts = load_prompts("synthetic", 64, 0)
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=128, max_keepalive_connections=64)) as client:
            running: set[asyncio.Task] = set()
            index = 0
            while not self._stop.is_set():
                task = asyncio.create_task(send_request(client, settings, self.model, prompts[index % len(prompts)]))
                running.add(task)
                task.add_done_callback(running.discard)
                task.add_done_callback(self._keep_result)
                index += 1
                await asyncio.sleep(1.0 / self.rate)
            if running:
                await asyncio.wait(running, timeout=settings.request_timeout)


def _wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def run_drill(settings: DrillSettings, directory: Path, *, on_event: Callable[..., None] = lambda **f: None,
              on_progress: Callable[[str], None] = lambda text: None) -> dict[str, Any]:
    """Ramp the arrival rate up and back down through a 1-replica pool; the timings and gates' metrics."""
    from gonogo.rollout.router import ThreadedServer
    from gonogo.stages.canary.stage import start_server
    from gonogo.errors import StageFailed
    from gonogo.rundir import write_json_atomic

    directory.mkdir(parents=True, exist_ok=True)
    checkpoint = settings.checkpoint or str(tiny_checkpoint(directory / "model"))
    scale = settings.autoscale
    started: list[Replica] = []

    def start_replica(name: str) -> Replica:
        process = start_server(checkpoint, name, directory, "gonogo")
        replica = Replica(name, "", process)
        started.append(replica)
        replica.url = process.wait_healthy(scale.readiness_timeout_s).rstrip("/")
        return replica

    def stop_replica(replica: Replica) -> None:
        if replica.process is not None:
            replica.process.stop()

    pool = Pool(scale)
    server = None
    autoscaler = None
    load = None
    marks: dict[str, float] = {}
    try:
        on_progress("starting the first replica")
        for index in range(scale.min_replicas):
            pool.add(start_replica(f"replica-{index + 1}"))
        server = ThreadedServer(pool.app).start()
        autoscaler = Autoscaler(pool, start_replica, stop_replica, on_event=on_event).start()
        t0 = autoscaler.t0
        load = RampLoad(server.url, "gonogo", settings.max_tokens)
        load.rate = settings.low_rate
        load.start()
        on_progress(f"low load {settings.low_rate:g}/s")
        time.sleep(settings.low_s)
        marks["ramp_up"] = time.monotonic() - t0
        peak = settings.high_rate
        if peak is None:
            served = [r.ended - r.started - r.queued_s for r in pool.all_records() if r.ok]
            if not served:
                raise StageFailed("no request succeeded in the low phase: the replica does not serve; see "
                                  f"{directory / 'replica-1-server.log'}")
            capacity = scale.max_concurrency * scale.min_replicas / (sum(served) / len(served))
            peak = settings.peak_factor * capacity
            marks["capacity_rps"] = capacity
        marks["peak_rps"] = peak
        load.rate = peak
        on_progress(f"peak {peak:.1f}/s: waiting for a scale-up")
        peak_ends = time.monotonic() + settings.high_max_s
        scaled = _wait_until(lambda: any(e["event"] == "replica_ready" for e in autoscaler.events), settings.high_max_s)
        if scaled:
            # hold the peak until the backlog of the one-replica minutes has drained and the queue
            # stayed empty for recover_window_s (bounded): the p95 of that window is "back under"
            calm_since: list[Optional[float]] = [None]

            def recovered() -> bool:
                now = time.monotonic()
                if pool.signals(now)["queue_depth"] > 0:
                    calm_since[0] = None
                    return False
                calm_since[0] = started = calm_since[0] or now
                return now - started >= settings.recover_window_s

            time.sleep(settings.high_hold_s)
            _wait_until(recovered, max(0.0, peak_ends - time.monotonic()))
        marks["ramp_down"] = time.monotonic() - t0
        load.rate = settings.low_rate
        on_progress(f"low load {settings.low_rate:g}/s: waiting for the scale-down")
        _wait_until(lambda: any(e["event"] == "replica_removed" for e in autoscaler.events)
                    and len(pool.ready()) <= scale.min_replicas, settings.down_max_s + scale.cooldown_s)
        time.sleep(1.0)
        marks["end"] = time.monotonic() - t0
    finally:
        if autoscaler is not None:      # the drill is over: no scaling while the last requests end
            autoscaler.stop()
        if load is not None:
            load.stop()
        if server is not None:
            server.stop()
        for replica in started:
            stop_replica(replica)
    metrics, timeline = analyse_drill(settings, autoscaler, pool, load, marks)
    write_json_atomic(directory / "autoscale.json", timeline)
    return metrics


def slo_breach(records: list[Record], t0: float, slo_s: float, window_s: float) -> Optional[float]:
    """When users first saw the SLO broken: the start (seconds after t0) of the first request at
    which the TTFT p95 of the requests started in the window before it is above the SLO. By start
    time, not completion: a queued request shows its wait only when it ends, seconds later."""
    started = sorted((r.started, r.ttft) for r in records if r.ttft is not None)
    for index, (moment, _) in enumerate(started):
        window = [ttft for begun, ttft in started[:index + 1] if moment - window_s <= begun]
        value = percentile(window, 95)
        if value is not None and value > slo_s:
            return round(moment - t0, 3)
    return None


def analyse_drill(settings: DrillSettings, autoscaler: Autoscaler, pool: Pool, load: RampLoad,
                  marks: dict[str, float]) -> tuple[dict[str, Any], dict[str, Any]]:
    t0, events, scale = autoscaler.t0, autoscaler.events, settings.autoscale
    first = lambda name: next((e for e in events if e["event"] == name), None)  # noqa: E731
    triggered, ready = first("scale_up_triggered"), first("replica_ready")
    down, removed = first("scale_down_triggered"), first("replica_removed")
    records = pool.all_records()

    def p95(since: float, until: float) -> Optional[float]:
        values = [r.ttft for r in records if r.ok and r.ttft is not None and since <= r.started - t0 < until]
        value = percentile(values, 95)
        return None if value is None else value * 1000.0

    breach = slo_breach(records, t0, settings.slo_ttft_p95_ms / 1000.0, scale.window_s)
    failures = [r for r in load.results if not r.success] if load is not None else []
    replicas_seen = [s["replicas"] for s in autoscaler.samples]
    unknown: dict[str, str] = {}
    metrics: dict[str, Any] = {
        "scaled_up": ready is not None, "scaled_down": removed is not None,
        "max_replicas_seen": max(replicas_seen) if replicas_seen else None,
        "final_replicas": replicas_seen[-1] if replicas_seen else None,
        "time_to_scale_up_s": ready["t"] - triggered["t"] if ready and triggered else None,
        "time_to_scale_down_s": (removed["t"] - marks["ramp_down"]) if removed and "ramp_down" in marks else None,
        "slo_breached": breach is not None,
        "breach_to_ready_s": (ready["t"] - breach) if ready and breach is not None else None,
        "ttft_p95_before_ms": p95(0, marks.get("ramp_up", 0)),
        "ttft_p95_peak_ms": p95(marks.get("ramp_up", 0), ready["t"] if ready else marks.get("ramp_down", 0)),
        "ttft_p95_after_scale_up_ms": (p95(max(ready["t"], marks["ramp_down"] - settings.recover_window_s),
                                           marks["ramp_down"]) if ready and "ramp_down" in marks else None),
        "requests": len(load.results) if load is not None else 0,
        "failed_requests": len(failures) if load is not None and load.results else None,
        "cooldown_s": scale.cooldown_s,
    }
    after = metrics["ttft_p95_after_scale_up_ms"]
    metrics["p95_back_under_slo"] = None if after is None else after <= settings.slo_ttft_p95_ms
    if not ready:
        unknown.update(time_to_scale_up_s="no scale-up happened", ttft_p95_after_scale_up_ms="no scale-up happened",
                       p95_back_under_slo="no scale-up happened")
    elif after is None:
        unknown.update(ttft_p95_after_scale_up_ms="no request completed after the new replica was ready",
                       p95_back_under_slo="no request completed after the new replica was ready")
    if breach is None:
        unknown["breach_to_ready_s"] = (f"the TTFT p95 never went above the SLO ({settings.slo_ttft_p95_ms:g} ms); the "
                                        f"scale-up came from the {scale.metric} signal first")
    if not removed:
        unknown["time_to_scale_down_s"] = "no scale-down happened"
    if metrics["failed_requests"] is None:
        unknown["failed_requests"] = "no client request was made"
    if unknown:
        metrics["unknown"] = unknown
    timeline = {"settings": settings.model_dump(), "marks": marks, "events": events, "samples": autoscaler.samples,
                "metrics": metrics, "failure_examples": sorted({r.error for r in failures})[:5],
                "down_triggered": down}
    return metrics, timeline


# -- Kubernetes: the same thresholds as KEDA and HPA ------------------------------------------------

def _selector(name: str, namespace: str) -> str:
    return f'namespace="{namespace}",app="{name}"'


def keda_scaled_object(settings: AutoscaleSettings, *, name: str, namespace: str,
                       prometheus: str = "http://prometheus-server.monitoring.svc:80") -> dict[str, Any]:
    """A KEDA ScaledObject: a Prometheus trigger on the gonogo servers' /metrics gauges."""
    where = _selector(name, namespace)
    query, threshold = {
        "concurrency": (f"sum(gonogo_num_requests_running{{{where}}}) + sum(gonogo_num_requests_waiting{{{where}}})",
                        settings.scale_up_threshold),
        "queue_depth": (f"sum(gonogo_num_requests_waiting{{{where}}})", settings.scale_up_threshold),
        "ttft_p95_ms": (f"1000 * histogram_quantile(0.95, sum by (le) (rate(gonogo_time_to_first_token_seconds_bucket"
                        f"{{{where}}}[{max(1, int(settings.window_s))}s])))", settings.scale_up_threshold),
    }[settings.metric]
    return {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": {"name": f"{name}-autoscale", "namespace": namespace},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicaCount": settings.min_replicas, "maxReplicaCount": settings.max_replicas,
            "pollingInterval": max(1, int(round(settings.interval_s))),
            "cooldownPeriod": max(1, int(round(settings.cooldown_s))),
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                "scaleDown": {"stabilizationWindowSeconds": int(round(settings.cooldown_s)),
                              "policies": [{"type": "Pods", "value": 1, "periodSeconds": 15}]},
                "scaleUp": {"stabilizationWindowSeconds": 0,
                            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 15}]}}}},
            "triggers": [{"type": "prometheus", "metricType": "AverageValue" if settings.metric == "concurrency"
                          else "Value", "metadata": {
                              "serverAddress": prometheus, "query": query, "threshold": f"{threshold:g}",
                              "activationThreshold": f"{settings.scale_down_threshold:g}"}}],
        },
    }


def hpa(settings: AutoscaleSettings, *, name: str, namespace: str) -> dict[str, Any]:
    """An autoscaling/v2 HorizontalPodAutoscaler on the per-pod gauge (served by a metrics adapter)."""
    metric = {"concurrency": "gonogo_num_requests_running", "queue_depth": "gonogo_num_requests_waiting",
              "ttft_p95_ms": "gonogo_time_to_first_token_p95_ms"}[settings.metric]
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": settings.min_replicas, "maxReplicas": settings.max_replicas,
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": metric},
                                                  "target": {"type": "AverageValue",
                                                             "averageValue": f"{settings.scale_up_threshold:g}"}}}],
            "behavior": {
                "scaleDown": {"stabilizationWindowSeconds": int(round(settings.cooldown_s)), "selectPolicy": "Max",
                              "policies": [{"type": "Pods", "value": 1, "periodSeconds": 15}]},
                "scaleUp": {"stabilizationWindowSeconds": 0, "selectPolicy": "Max",
                            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 15}]}},
        },
    }


def validate_manifest(document: dict[str, Any]) -> list[str]:
    """Problems of a manifest against the shipped schema subset of its kind ([] when it is valid)."""
    import jsonschema

    schema_file = {"ScaledObject": "keda-scaledobject-v1alpha1.json",
                   "HorizontalPodAutoscaler": "hpa-autoscaling-v2.json"}[document["kind"]]
    schema = json.loads((SCHEMAS / schema_file).read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
            for error in validator.iter_errors(document)]


def write_manifests(directory: Path, settings: AutoscaleSettings, *, name: str = "gonogo",
                    namespace: str = "default") -> list[Path]:
    import yaml

    from gonogo.errors import StageFailed

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for filename, document in (("keda-scaledobject.yaml", keda_scaled_object(settings, name=name, namespace=namespace)),
                               ("hpa.yaml", hpa(settings, name=name, namespace=namespace))):
        problems = validate_manifest(document)
        if problems:
            raise StageFailed(f"{filename} does not validate: {problems[0]}")
        path = directory / filename
        path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
        paths.append(path)
    return paths


# -- the stage kind and `gonogo drill autoscale` -------------------------------------------------

GATES = ("scaled_up == true", "max_replicas_seen >= 2", "scaled_down == true", "final_replicas == 1",
         "failed_requests == 0", "p95_back_under_slo == true", "time_to_scale_up_s <= 60")


def run(ctx: Any, settings: DrillSettings) -> dict[str, Any]:
    if settings.checkpoint:
        settings = settings.model_copy(update={"checkpoint": ctx.resolve_model(settings.checkpoint)})
    metrics = run_drill(settings, ctx.stage_dir, on_event=lambda **fields: ctx.event(**fields),
                        on_progress=ctx.progress)
    write_manifests(ctx.stage_dir / "k8s", settings.autoscale)
    metrics["manifests_valid"] = True  # write_manifests raised otherwise
    return metrics


def report(stage_dir: Path, metrics: dict[str, Any]) -> list:
    from gonogo.plots import new_figure, to_png
    from gonogo.stages.base import ReportItem

    path = stage_dir / "autoscale.json"
    if not path.is_file():
        return []
    timeline = json.loads(path.read_text(encoding="utf-8"))
    samples = timeline["samples"]
    items = []
    if samples:
        figure, axes = new_figure()
        times = [s["t"] for s in samples]
        axes.step(times, [s["replicas"] for s in samples], where="post", label="ready replicas", color="black")
        axes.plot(times, [s["concurrency"] for s in samples], label="concurrency per replica", alpha=0.7)
        twin = axes.twinx()
        twin.plot(times, [s["ttft_p95_ms"] for s in samples], color="tab:red", alpha=0.6, label="TTFT p95 (ms)")
        twin.axhline(timeline["settings"]["slo_ttft_p95_ms"], color="tab:red", linestyle="--", linewidth=0.8)
        twin.set_ylabel("TTFT p95 (ms)")
        for t in timeline["marks"].values():
            axes.axvline(t, color="grey", linestyle=":", linewidth=0.8)
        axes.set_xlabel("drill time (s)")
        axes.legend(loc="upper left")
        items.append(ReportItem("replicas, load and TTFT p95 over the ramp", png=to_png(figure)))
    items.append(ReportItem("scaling events", table=[
        {"t (s)": e["t"], "event": e["event"], "replica": e.get("replica"), "signal": e.get("signal")}
        for e in timeline["events"]] or None, text=None if timeline["events"] else "no scaling event"))
    return items


class AutoscaleStageSettings(DrillSettings, StageSettings):
    """The drill's settings as a plan stage's."""


STAGE = StageKind(
    name="autoscale",
    description="a replica pool behind a router with an autoscaler, driven by a ramp of arrivals; KEDA/HPA manifests",
    settings=AutoscaleStageSettings, metrics=lambda settings: METRICS | {"manifests_valid"}, run=run,
    report=report)


def drill_command(args: Any) -> int:
    """``gonogo drill autoscale``: the autoscale kind as a one-stage plan in memory, through the
    runner like every stage (the drill's gates), the timings printed."""
    from rich.console import Console

    from gonogo.rundir import RunDir
    from gonogo.runner import run_stage_alone
    from gonogo.typed_config import validate

    settings = validate(AutoscaleStageSettings,
                        {"checkpoint": str(Path(args.checkpoint).resolve())} if args.checkpoint else {},
                        source="gonogo drill autoscale")
    run_dir = RunDir.create(args.out, "autoscale")
    Console(stderr=True).print(f"run directory: {run_dir.root}", markup=False)
    outcome = run_stage_alone(STAGE, settings, run_dir=run_dir, gates=list(GATES) + ["manifests_valid == true"])
    entry = outcome.summary["stages"][0]
    out = Console()
    path = run_dir.stage_dir("autoscale", create=False) / "autoscale.json"
    if path.is_file():
        for event in json.loads(path.read_text(encoding="utf-8"))["events"]:
            signal = event.get("signal")
            out.print(f"  {event['t']:7.2f} s  {event['event']:22} {event.get('replica', '')}"
                      + (f"  signal {signal:.2f}" if isinstance(signal, (int, float)) else ""))
    metrics = entry["metrics"]
    for key in ("time_to_scale_up_s", "breach_to_ready_s", "time_to_scale_down_s", "ttft_p95_before_ms",
                "ttft_p95_peak_ms", "ttft_p95_after_scale_up_ms", "max_replicas_seen", "final_replicas", "requests",
                "failed_requests"):
        value = metrics.get(key)
        out.print(f"  {key:28} {'—' if value is None else (f'{value:.3g}' if isinstance(value, float) else value)}")
    for gate in entry["gates"]:
        out.print(f"  gate {gate['expression']:32} {gate['status']}")
    for name in ("keda-scaledobject.yaml", "hpa.yaml"):
        manifest = run_dir.stage_dir("autoscale", create=False) / "k8s" / name
        if manifest.is_file():
            out.print(f"  manifest {manifest} (validated)")
    out.print(f"[bold]{outcome.verdict}[/bold]  report: {run_dir.report_path}")
    for reason in outcome.reasons:
        out.print(f"  {reason}", markup=False)
    return outcome.exit_code
