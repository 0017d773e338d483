"""`gonogo canary`, the stage kind `canary`, and the canary drill (`run_canary_drill`).

A rollout: start (checkpoint → a server child on a free loopback port, on the side's engine:
gonogo, vLLM or a command) or attach to (URL) the stable and canary servers, put the router in front of them, drive a steady load through it,
and let the controller step the weight, analyse each interval and promote or roll back. Outputs
(in the stage directory): timeline.json (decision, every interval, weight changes, webhook calls)
and the started servers' logs; the runner writes metrics.json. ``gonogo canary`` runs this stage
alone through the plan runner (gonogo.stage_cli), gated by ``promoted == true``; ``--emit-k8s``
writes manifests instead.

Client-visible errors are the steady load's failed requests, attributed to stable, canary or
router from the router's own records; a failure the router never saw (the router itself
refused or broke the connection) is the router's.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import logging
import shlex
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import Field

from gonogo.errors import StageFailed, UserError
from gonogo.infer.engines.process import ServerProcess
from gonogo.infer.engines.start import (
    EngineSettings,
    GonogoServeOptions,
    default_startup_timeout,
    preflight,
    start_engine,
)
from gonogo.rollout.analysis import CHECKS, QUALITY_CONCURRENCY, Analysis, check_consistent, parse_check
from gonogo.rollout.controller import Controller, Side, Webhooks
from gonogo.stages.base import ReportItem, StageCommand, StageKind, StageSettings
from gonogo.typed_config import Strict

log = logging.getLogger(__name__)

METRICS = {"promoted", "rolled_back", "halted", "failed_checks", "client_errors", "client_errors_router",
           "client_errors_stable", "client_errors_canary", "client_requests", "time_to_decision_s",
           "intervals", "drained"}


class Load(Strict):
    """The steady load driven through the router during the rollout (streaming chat requests)."""

    rate: float = Field(4.0, gt=0)          # requests per second
    concurrency: int = Field(4, ge=1)
    max_tokens: int = Field(16, ge=1)


class CanarySettings(StageSettings):
    stable: str                              # checkpoint / run dir, or http(s):// URL of a running server
    canary: str
    analysis: Analysis = Field(default_factory=Analysis)
    webhooks: Webhooks = Field(default_factory=Webhooks)
    load: Load = Field(default_factory=Load)
    model_name: str = "gonogo"               # for servers we start
    # the engine each started side runs on: gonogo -> vllm on one checkpoint is an engine migration
    stable_engine: EngineSettings = Field(default_factory=EngineSettings)
    canary_engine: EngineSettings = Field(default_factory=EngineSettings)
    startup_timeout_s: Optional[float] = Field(None, gt=0)   # default: per engine (180 s gonogo, 900 s vLLM)
    drain_timeout_s: float = Field(30.0, gt=0)


# -- backends -----------------------------------------------------------------------------------

def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def start_server(checkpoint: str, name: str, directory: Path, model_name: str,
                 engine: Optional[EngineSettings] = None) -> ServerProcess:
    """``checkpoint`` on ``engine`` (default gonogo) on a free loopback port, started, not yet waited for;
    its log is directory/<name>-server.log."""
    from gonogo.checkpoints import resolve

    resolve(checkpoint)  # a wrong path is the user's one-line error, before anything starts
    # one thread each: stable and canary share the machine's cores
    return start_engine(engine or EngineSettings(), str(checkpoint), directory, name=f"{name}-server",
                        model_name=model_name, gonogo_options=GonogoServeOptions(threads=1))


def model_of(url: str, timeout: float = 10.0) -> str:
    import httpx

    try:
        response = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=timeout)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as error:
        raise StageFailed(f"{url}: cannot list its models ({type(error).__name__}); is it an "
                          f"OpenAI-compatible server?") from None


def _is_chat_checkpoint(spec: str) -> bool:
    """Whether a checkpoint was finetuned on chats (its meta.json says data.format = chat)."""
    from gonogo.checkpoints import resolve
    from gonogo.eval.evaluate import checkpoint_is_chat

    ref = resolve(spec)  # verified once per process: a second resolve of it is a cache hit
    return ref.format != "hf" and checkpoint_is_chat(ref.meta)


def open_sides(settings: CanarySettings, directory: Path) -> tuple[Side, Side]:
    """Start or attach to both servers; started ones are stopped by their Side.stop and recorded in
    <side>-server.json (url, pid, engine, startup_seconds)."""
    from gonogo.rundir import write_json_atomic

    started: dict[str, ServerProcess] = {}
    try:
        for name in ("stable", "canary"):
            spec = getattr(settings, name)
            if not is_url(spec):
                started[name] = start_server(spec, name, directory, settings.model_name,
                                             getattr(settings, f"{name}_engine"))
        sides = {}
        for name in ("stable", "canary"):
            spec = getattr(settings, name)
            if name in started:
                server = started[name]
                engine = getattr(settings, f"{name}_engine")
                url = server.wait_healthy(settings.startup_timeout_s or default_startup_timeout(engine))
                write_json_atomic(directory / f"{name}-server.json", {
                    "url": url, "pid": server.pid, "engine": engine.name,
                    "startup_seconds": round(server.startup_seconds or 0.0, 2)})
                stop = functools.partial(server.stop, grace=5.0)
            else:
                url, stop = spec.rstrip("/"), None
            sides[name] = Side(url=url, model=model_of(url), stop=stop,
                               chat=name in started and _is_chat_checkpoint(spec))
        return sides["stable"], sides["canary"]
    except BaseException:
        for server in started.values():
            server.stop(grace=5.0)
        raise


# -- the steady load ---------------------------------------------------------------------------

class SteadyLoad:
    """Streaming chat requests at a fixed rate (bounded concurrency) until stopped, in a thread."""

    def __init__(self, url: str, model: str, load: Load, seed: int = 0):
        self.url, self.model, self.load, self.seed = url, model, load, seed
        self.results: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="steady-load", daemon=True)

    def _keep_result(self, task: "asyncio.Task") -> None:
        if not task.cancelled():
            self.results.append(task.result())

    def start(self) -> "SteadyLoad":
        self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout)
        if self._thread.is_alive():
            log.error("the steady load did not stop within %.0f s", timeout)

    async def _main(self) -> None:
        import httpx

        from gonogo.stages.loadtest.stage import LoadSettings, load_prompts, send_request

        settings = LoadSettings(url=self.url, model=self.model, max_tokens=self.load.max_tokens,
                                temperature=0.0, request_timeout=60.0)
        prompts = load_prompts("synthetic", 64, self.seed)
        limits = httpx.Limits(max_connections=self.load.concurrency, max_keepalive_connections=self.load.concurrency)
        async with httpx.AsyncClient(limits=limits) as client:
            running: set[asyncio.Task] = set()
            index = 0
            while not self._stop.is_set():
                if len(running) < self.load.concurrency:
                    task = asyncio.create_task(send_request(client, settings, self.model, prompts[index % len(prompts)]))
                    running.add(task)
                    task.add_done_callback(running.discard)
                    task.add_done_callback(self._keep_result)
                    index += 1
                await asyncio.sleep(1.0 / self.load.rate)
            if running:  # in-flight requests finish (bounded by their own timeout)
                await asyncio.wait(running, timeout=settings.request_timeout)


# -- one rollout -------------------------------------------------------------------------------

def run_rollout(stable: Side, canary: Side, settings: CanarySettings, directory: Path, *, name: str = "canary",
                on_event: Callable[..., None] = lambda **fields: None,
                on_progress: Callable[[str], None] = lambda text: None) -> dict[str, Any]:
    """Router + steady load + controller over two running servers -> metrics; writes timeline.json."""
    from gonogo.rollout.router import start_router
    from gonogo.rundir import write_json_atomic

    directory.mkdir(parents=True, exist_ok=True)
    router, server = start_router(stable.url, canary.url)
    load = None
    try:
        load = SteadyLoad(server.url, stable.model, settings.load).start()
        controller = Controller(router, server.url, stable, canary, settings.analysis, webhooks=settings.webhooks,
                                drain_timeout=settings.drain_timeout_s, name=name, on_event=on_event,
                                on_progress=on_progress)
        decision = controller.run()
        # a little traffic after the decision shows the new routing holds
        time.sleep(min(0.5, settings.analysis.interval_s))
    finally:
        if load is not None:
            load.stop()
        records = router.all_records()
        server.stop()
    client_failures = [r for r in load.results if not r.success]
    by_source = {source: 0 for source in ("stable", "canary", "router")}
    for record in records:
        if not record.pinned and record.error_source:
            by_source[record.error_source] += 1
    unseen = len(client_failures) - sum(by_source.values())
    by_source["router"] += max(unseen, 0)
    metrics: dict[str, Any] = {"promoted": decision.promoted, "rolled_back": decision.rolled_back, "halted": decision.halted,
               "failed_checks": decision.failed_checks, "client_errors": len(client_failures),
               "client_errors_router": by_source["router"], "client_errors_stable": by_source["stable"],
               "client_errors_canary": by_source["canary"], "client_requests": len(load.results),
               "time_to_decision_s": round(decision.time_to_decision_s, 3), "intervals": decision.intervals,
               "drained": decision.drained}
    if not load.results:
        # no client request was made: "no client error" would be a count over nothing
        for key in ("client_errors", "client_errors_router", "client_errors_stable", "client_errors_canary"):
            metrics[key] = None
        metrics["unknown"] = dict.fromkeys(
            ("client_errors", "client_errors_router", "client_errors_stable", "client_errors_canary"),
            "the steady load made no request during the rollout")
    write_json_atomic(directory / "timeline.json", {
        "name": name, "stable": stable.url, "canary": canary.url, "reason": decision.reason,
        "stable_accuracy": decision.stable_accuracy, "metrics": metrics, "settings": settings.model_dump(),
        "weights": decision.weights, "intervals": decision.timeline, "webhooks": decision.webhooks,
        "client_failure_examples": sorted({r.error for r in client_failures})[:5]})
    return metrics


def run_canary(settings: CanarySettings, directory: Path, **callbacks: Any) -> dict[str, Any]:
    from gonogo.checkpoints import resolve

    check_consistent(settings.analysis, "canary")
    for name in ("stable", "canary"):
        if not is_url(getattr(settings, name)):
            resolve(getattr(settings, name))  # a wrong path: one line before anything is created
            preflight(getattr(settings, f"{name}_engine"))
    directory.mkdir(parents=True, exist_ok=True)
    stable, canary = open_sides(settings, directory)
    try:
        return run_rollout(stable, canary, settings, directory, **callbacks)
    finally:
        for side in (stable, canary):  # idempotent: a stopped group is not there any more
            if side.stop is not None:
                side.stop()


# -- the stage kind -----------------------------------------------------------------------------

def run(ctx, settings: CanarySettings) -> dict[str, Any]:
    # "@stage" names the model an earlier stage of the plan produced; URLs stay as they are
    resolved = settings.model_copy(update={name: ctx.resolve_model(getattr(settings, name))
                                           for name in ("stable", "canary")})
    return run_canary(resolved, ctx.stage_dir, on_event=lambda **fields: ctx.event(step=0, **fields),
                      on_progress=ctx.progress)


def report(stage_dir: Path, metrics: dict[str, Any]) -> Optional[list[ReportItem]]:
    path = stage_dir / "timeline.json"
    if not path.is_file():
        return None
    from gonogo.plots import new_figure, to_png

    data = json.loads(path.read_text())
    intervals = data["intervals"]
    figure, axes = new_figure(height=2.8)
    times = [change["t"] for change in data["weights"]] or [0.0]
    weights = [change["weight"] for change in data["weights"]] or [0]
    end = max([times[-1]] + [interval["t"] for interval in intervals])
    axes.step(times + [end], weights + [weights[-1]], where="post")
    axes.set_xlabel("seconds since start")
    axes.set_ylabel("canary weight (%)")
    items = [ReportItem(title="Canary weight over time", png=to_png(figure))]
    if intervals:
        figure, axes = new_figure(height=2.8)
        x = range(1, len(intervals) + 1)
        for side, key, style in (("canary", "e2el_p99_ms", "-o"), ("stable", "e2el_p99_ms", "--o"),
                                 ("canary", "ttft_p99_ms", "-x")):
            axes.plot(x, [i[side][key] or float("nan") for i in intervals], style, label=f"{side} {key}")
        axes.set_xlabel("interval")
        axes.set_ylabel("ms")
        axes.legend()
        items.append(ReportItem(title="Latency per interval", png=to_png(figure)))
        if any(i["accuracy"] is not None for i in intervals):
            figure, axes = new_figure(height=2.8)
            axes.plot(x, [i["accuracy"] for i in intervals], "-o", label="canary")
            axes.axhline(data["stable_accuracy"] or 0.0, linestyle="--", label="stable")
            axes.set_ylim(-0.05, 1.05)
            axes.set_xlabel("interval")
            axes.set_ylabel("exact-match accuracy")
            axes.legend()
            items.append(ReportItem(title="Accuracy per interval", png=to_png(figure)))
        items.append(ReportItem(title="Intervals", table=[{
            "t (s)": round(i["t"], 1), "weight": i["weight"], "passed": i["passed"],
            "failed checks": i["failed_checks"], "requests": i["canary"]["requests"],
            "success": i["canary"]["success_rate"], "e2el p99 ms": i["canary"]["e2el_p99_ms"],
            "accuracy": i["accuracy"],
            "failing": "; ".join(f"{c['name']}: {c['reason']}" for c in i["checks"] if not c["passed"])}
            for i in intervals]))
    outcome = "promoted" if metrics.get("promoted") else "rolled back"
    items.append(ReportItem(title="Decision", text=f"{outcome} after {metrics.get('time_to_decision_s')} s: "
                                                   f"{data['reason']}"))
    return items


def _preflight_engines(settings: CanarySettings) -> None:
    """Each side this stage starts needs its engine here (an attached URL is someone else's)."""
    for side in ("stable", "canary"):
        if not is_url(getattr(settings, side)):
            preflight(getattr(settings, f"{side}_engine"))


# -- `gonogo canary`: the stage alone, through the plan runner ---------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stable", help="checkpoint / run dir, or URL of a running OpenAI-compatible server")
    parser.add_argument("--canary", help="checkpoint / run dir, or URL of the new version's server")
    for side in ("stable", "canary"):
        parser.add_argument(f"--{side}-engine", choices=["gonogo", "vllm", "command"], default="gonogo",
                            help=f"engine that serves the {side} checkpoint (gonogo -> vllm: an engine migration)")
    parser.add_argument("--engine-command", metavar="TEMPLATE",
                        help='for engine "command": the server\'s command line with {model} and {port}')
    parser.add_argument("--steps", default="10,25,50,100", help="canary weights in percent, increasing, ending at 100")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds each step is held and analysed")
    parser.add_argument("--threshold", type=int, default=2, help="failed checks (cumulative) that roll back")
    parser.add_argument("--min-success-rate", type=float, default=0.99, help="0..1 (Flagger's request-success-rate/100)")
    parser.add_argument("--max-ttft-p99-ms", type=float)
    parser.add_argument("--max-e2el-p99-ms", type=float)
    parser.add_argument("--max-latency-ratio", type=float, help="canary p99 / stable p99, >= 1")
    parser.add_argument("--min-accuracy", type=float, help="canary exact-match accuracy on held-out problems, 0..1")
    parser.add_argument("--max-accuracy-drop", type=float, help="stable accuracy minus canary accuracy, 0..1")
    parser.add_argument("--check", action="append", default=[], metavar="METRIC=VALUE",
                        help=f"any threshold by metric name ({', '.join(CHECKS)})")
    parser.add_argument("--quality-prompts", type=int, default=8, help="held-out problems asked at each step")
    parser.add_argument("--load-rate", type=float, default=4.0, help="steady load through the router, requests/s")
    parser.add_argument("--load-concurrency", type=int, default=4)
    for hook in ("pre-rollout", "confirm-promotion", "rollback"):
        parser.add_argument(f"--webhook-{hook}", metavar="URL", help=f"POST here at {hook}")
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory (default: runs/canary-<time>); the rollout's timeline, metrics and "
                             "server logs are in its stages/canary/")
    parser.add_argument("--emit-k8s", type=Path, metavar="DIR",
                        help="write the same rollout as Flagger Canary and Argo Rollouts manifests, then exit")
    parser.add_argument("--name", default="gonogo", help="Kubernetes deployment / service name for --emit-k8s")


def _settings_table(args: argparse.Namespace) -> dict[str, Any]:
    """The settings table the flags describe (``stable`` / ``canary`` empty when not given)."""
    try:
        steps = [int(step) for step in args.steps.split(",") if step.strip()]
    except ValueError:
        raise UserError(f"--steps {args.steps!r}: give comma-separated integers, e.g. 10,25,50,100") from None
    thresholds = {"success_rate": args.min_success_rate, "ttft_p99_ms": args.max_ttft_p99_ms,
                  "e2el_p99_ms": args.max_e2el_p99_ms, "latency_ratio": args.max_latency_ratio,
                  "accuracy": args.min_accuracy, "accuracy_drop": args.max_accuracy_drop}
    thresholds.update(parse_check(item) for item in args.check)
    data: dict[str, Any] = {
        "stable": args.stable or "", "canary": args.canary or "",
        "analysis": {"steps": steps, "interval_s": args.interval, "threshold": args.threshold,
                     "thresholds": thresholds, "quality_prompts": args.quality_prompts},
        "webhooks": {"pre_rollout": args.webhook_pre_rollout, "confirm_promotion": args.webhook_confirm_promotion,
                     "rollback": args.webhook_rollback},
        "load": {"rate": args.load_rate, "concurrency": args.load_concurrency}}
    for side in ("stable", "canary"):
        engine = getattr(args, f"{side}_engine")
        command = shlex.split(args.engine_command) if engine == "command" and args.engine_command else None
        data[f"{side}_engine"] = {"name": engine, "command": command}
    return data


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    if not args.stable or not args.canary:
        raise UserError("give both --stable and --canary (a checkpoint directory or a server URL)")
    return _settings_table(args)


def _check(args: argparse.Namespace, settings: CanarySettings) -> None:
    """The analysis and both checkpoints, before the run directory exists and anything starts."""
    from gonogo.checkpoints import resolve

    check_consistent(settings.analysis, "gonogo canary")
    for name in ("stable", "canary"):
        if not is_url(getattr(settings, name)):
            resolve(getattr(settings, name))  # a wrong path: one line, nothing created


def _emit_k8s(args: argparse.Namespace) -> Optional[int]:
    """``--emit-k8s DIR``: the same rollout as Kubernetes manifests, and nothing run."""
    if not args.emit_k8s:
        return None
    from rich.console import Console

    from gonogo.rollout.k8s import write_k8s
    from gonogo.typed_config import validate

    settings = validate(CanarySettings, _settings_table(args), source="gonogo canary")
    check_consistent(settings.analysis, "gonogo canary")
    console = Console()
    for path in write_k8s(args.emit_k8s, settings, name=args.name):
        console.print(f"wrote {path}")
    return 0


def _summary(args: argparse.Namespace, stage_dir: Path, metrics: dict[str, Any]) -> None:
    """The decision and the rollout's metrics on stdout."""
    if "promoted" not in metrics:  # the rollout never ran (a server that did not come up)
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"canary: {'PROMOTED' if metrics['promoted'] else 'ROLLED BACK'}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if key in METRICS or key == "unknown":
            table.add_row(key, str(value))
    console.print(table)
    console.print(f"timeline: {stage_dir / 'timeline.json'}")


STAGE = StageKind(
    name="canary",
    description="staged canary rollout through a weighted router, with metric and quality checks and rollback",
    settings=CanarySettings,
    metrics=lambda settings: set(METRICS),
    run=run,
    report=report,
    # each server this stage starts holds a device; attached URLs are someone else's
    devices=lambda settings: sum(not is_url(getattr(settings, side)) for side in ("stable", "canary")),
    preflight=_preflight_engines,
    # promoted: GO (exit 0); rolled back or halted: NO-GO (exit 1), as `gonogo canary` always exited
    default_gates=lambda settings: ["promoted == true"],
    command=StageCommand(add_arguments=add_arguments, settings=_settings, check=_check, summary=_summary,
                         instead=_emit_k8s),
)


# -- the drill ---------------------------------------------------------------------------------

DRILLS = ("latency", "errors", "degraded", "good")


def run_canary_drill(out_dir: Path, checkpoint: str | Path, *, steps: tuple[int, ...] = (25, 50, 100),
                     interval_s: float = 2.0, threshold: int = 2, quality_prompts: int = 48,
                     injected_latency_s: float = 1.5, error_rate: float = 0.5, degrade_bits: int = 2,
                     load: Optional[Load] = None, drills: tuple[str, ...] = DRILLS,
                     startup_timeout_s: float = 180.0) -> dict[str, Any]:
    """Four rollouts against one stable server of ``checkpoint``: a canary with added latency, one
    answering 5xx (both fault proxies in front of a good server), a degraded model (weights rounded
    to ``degrade_bits`` bits, only the quality check can see it) and a good one (the same model).
    The bad ones must be rolled back and the good one promoted. Writes out_dir/<drill>/timeline.json
    and out_dir/drill.json; returns {"passed", "drills": {name: metrics + expected}}."""
    from gonogo.rollout.canary_faults import FaultProxy, write_degraded_checkpoint
    from gonogo.rundir import write_json_atomic

    unknown = [d for d in drills if d not in DRILLS]
    if unknown:
        raise UserError(f"unknown canary drills {unknown}; known: {', '.join(DRILLS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    degraded_dir = out_dir / "degraded-checkpoint"
    if "degraded" in drills and not degraded_dir.exists():
        write_degraded_checkpoint(checkpoint, degraded_dir, bits=degrade_bits)
    # latency checks are relative to stable and absolute with room for a loaded machine
    analysis = Analysis(steps=list(steps), interval_s=interval_s, threshold=threshold,
                        quality_prompts=quality_prompts, quality_max_tokens=96, ratio_floor_ms=200.0,
                        # half an engine's batch (16 rows) at a time: the drill's traffic still
                        # finds a free row. All 48 at once queued the traffic behind 32 probe
                        # prompts (a good canary's p99 4.8x stable's on a slow AVX2 EPYC: rolled
                        # back) and, two drills side by side, overflowed the stable server (429)
                        quality_concurrency=max(1, min(quality_prompts, QUALITY_CONCURRENCY // 2)),
                        # the drill's canaries are attached by URL: say how the model is asked
                        quality_format="chat" if _is_chat_checkpoint(str(checkpoint)) else "text",
                        # the good canary is the stable model itself, so its greedy answers (and
                        # accuracy) are identical: any drop at all is the degradation
                        thresholds={"success_rate": 0.95, "latency_ratio": 4.0,
                                    "e2el_p99_ms": 1000 * injected_latency_s * 0.8,
                                    "accuracy_drop": 0.1})
    settings = CanarySettings(stable=str(checkpoint), canary=str(checkpoint), analysis=analysis,
                              load=load or Load(rate=3.0, concurrency=3, max_tokens=8),
                              startup_timeout_s=startup_timeout_s, drain_timeout_s=20.0)
    processes = {}
    try:
        wanted = {"stable": checkpoint, "good": checkpoint}
        if "degraded" in drills:
            wanted["degraded"] = degraded_dir
        for name, path in wanted.items():
            processes[name] = start_server(str(path), name, out_dir, settings.model_name)
        urls = {name: server.wait_healthy(startup_timeout_s) for name, server in processes.items()}
        stable = Side(url=urls["stable"], model=model_of(urls["stable"]))
        good_model = model_of(urls["good"])

        def one(drill: str) -> dict[str, Any]:
            proxy = None
            if drill == "latency":
                proxy = FaultProxy(urls["good"], latency_s=injected_latency_s).start()
            elif drill == "errors":
                proxy = FaultProxy(urls["good"], error_rate=error_rate).start()
            if proxy is not None:
                canary = Side(url=proxy.url, model=good_model, stop=proxy.stop)
            elif drill == "degraded":
                canary = Side(url=urls["degraded"], model=model_of(urls["degraded"]),
                              stop=lambda: processes["degraded"].stop(grace=5.0))
            else:
                canary = Side(url=urls["good"], model=good_model)
            # each rollout its own router, load and controller; only the good one's promotion retires stable
            side = dataclasses.replace(
                stable, stop=(lambda: processes["stable"].stop(grace=5.0)) if drill == "good" else None)
            drill_settings = settings
            if drill == "latency":
                # its probe waits in the slow proxy (injected_latency_s before each request reaches the
                # server), not in the engine's rows: a whole batch at a time halves its time to decision
                drill_settings = settings.model_copy(update={"analysis": analysis.model_copy(
                    update={"quality_concurrency": max(1, min(quality_prompts, QUALITY_CONCURRENCY))})})
            directory = out_dir / drill
            directory.mkdir(exist_ok=True)
            log.info("canary drill %s", drill)
            try:
                metrics = run_rollout(side, canary, drill_settings, directory, name=f"drill-{drill}")
            finally:
                if proxy is not None:
                    proxy.stop()
            expected = "promoted" if drill == "good" else "rolled_back"
            return {**metrics, "expected": expected,
                    "as_expected": bool(metrics[expected]) and metrics["client_errors_router"] == 0}

        # the bad canaries in two chains side by side: the latency one (a proxy in front of the good
        # server) alone, and the degraded one (its own server) followed by the errors one (a proxy in
        # front of the good server); each must be rolled back whatever the others do, and the shared
        # servers only get busier, which no check of a bad canary needs. The good one last, alone:
        # its latency is compared with an unloaded stable and its promotion retires stable. One
        # after the other, the bad three took 22 of the stage's 41 s; the latency one alone takes
        # about as long as the other two together (its probe waits in the slow proxy). The latency
        # and errors probes may meet on the good server: 16 and 8 prompts at a time plus the drills'
        # traffic stay under its 16 rows + 64 waiting (all 48 at once each overflowed it: HTTP 429).
        from concurrent.futures import ThreadPoolExecutor

        def chain(names: list[str]) -> dict[str, dict[str, Any]]:
            return {name: one(name) for name in names}

        outcomes: dict[str, dict[str, Any]] = {}
        for chains in ([["latency"], ["degraded", "errors"]], [["good"]]):
            chains = [[d for d in names if d in drills] for names in chains]
            chains = [names for names in chains if names]
            if len(chains) == 1:
                outcomes.update(chain(chains[0]))
            elif chains:
                with ThreadPoolExecutor(max_workers=len(chains), thread_name_prefix="canary-drill") as pool:
                    for chain_outcomes in pool.map(chain, chains):
                        outcomes.update(chain_outcomes)
        outcomes = {d: outcomes[d] for d in DRILLS if d in outcomes}
    finally:
        for server in processes.values():
            server.stop(grace=5.0)
    result = {"passed": all(o["as_expected"] for o in outcomes.values()), "drills": outcomes}
    write_json_atomic(out_dir / "drill.json", result)
    return result
