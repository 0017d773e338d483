"""The load tester: `gonogo loadtest` and the stage kind `loadtest`.

Works against any OpenAI-compatible server (ours or vLLM). Requests arrive as a Poisson or gamma
process (vLLM's convention: gamma(shape=burstiness, scale=1/(rate·burstiness)); burstiness 1 is
Poisson), optionally capped by a maximum concurrency, and stream their responses.

Per request (vLLM's definitions): TTFT = time to the first chunk with content; ITL = the gaps
between later content chunks; TPOT = (E2EL − TTFT)/(output_tokens − 1); E2EL = the whole request.
The result JSON uses the field names of vLLM's ``bench serve`` (``completed``,
``request_throughput``, ``mean_ttft_ms``, ``p99_itl_ms``, ``ttfts``, ``itls``, ``errors`` ...).
Goodput counts requests that meet every SLO given (with no SLO given, every completed request).

``gonogo loadtest`` runs this stage alone through the plan runner (gonogo.stage_cli): a run
directory with the result in ``stages/loadtest/result.json``, ``--json F`` a copy of it, and the
default gate ``success_rate == 1`` (NO-GO, exit 1, when any request failed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import numpy as np

from gonogo.errors import StageFailed, UserError
from gonogo.stages.base import Metrics, ReportItem, StageCommand, StageKind, StageSettings

RESULT_FILE = "result.json"   # the whole result, vLLM's field names (what --json copies)
PERCENTILES = (90, 95, 99)
SLO_NAMES = ("ttft", "tpot", "e2el")
GATE_METRICS = {"ttft_p95_ms", "e2el_p99_ms", "tpot_p95_ms", "success_rate", "output_tokens_per_second",
                "request_goodput", "completed", "failed", "request_throughput", "ttft_p99_ms", "itl_p95_ms"}


@dataclass
class LoadSettings:
    url: str
    endpoint: Literal["chat", "completions"] = "chat"
    model: Optional[str] = None              # None = the first model the server lists
    rate: float = math.inf                   # requests per second; inf = all at once
    burstiness: float = 1.0
    max_concurrency: Optional[int] = None
    num_requests: Optional[int] = None       # None: 100, or unlimited when duration is given
    duration: Optional[float] = None         # stop sending new requests after this many seconds
    warmup: int = 2
    dataset: str = "synthetic"
    max_tokens: int = 64
    temperature: float = 0.0
    ignore_eos: bool = False                 # ask for exactly max_tokens (vLLM's extension field)
    goodput: dict[str, float] = field(default_factory=dict)   # {"ttft": ms, "tpot": ms, "e2el": ms}
    api_key: Optional[str] = None
    request_timeout: float = 120.0
    seed: int = 0


@dataclass
class RequestResult:
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start_time: float = 0.0
    generated_text: str = ""
    success: bool = False
    error: str = ""
    token_times: list[float] = field(default_factory=list)


# -- prompts ---------------------------------------------------------------------------------

def load_prompts(dataset: str, count: int, seed: int) -> list[str]:
    """Prompt texts: the built-in reasoning corpus's held-out split, or a JSONL file's prompts."""
    if dataset == "synthetic":
        from gonogo.data.synthetic import generate

        return [problem.prompt for problem in generate("heldout", seed, max(count, 1))]
    path = Path(dataset)
    if not path.is_file():
        raise UserError(f"--dataset {dataset}: no such file (give 'synthetic' or a JSONL file)")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        text = None
        if isinstance(record, dict):
            text = record.get("prompt") or record.get("text")
            if text is None and isinstance(record.get("messages"), list):
                users = [m.get("content") for m in record["messages"] if isinstance(m, dict) and m.get("role") == "user"]
                text = users[0] if users else None
        if not isinstance(text, str) or not text:
            raise UserError(f"{path}:{number}: expected an object with a 'prompt', 'text' or user 'messages' field")
        prompts.append(text)
    if not prompts:
        raise UserError(f"{path}: no prompts in the file")
    return [prompts[i % len(prompts)] for i in range(count)]


# -- one request ------------------------------------------------------------------------------

async def send_request(client, settings: LoadSettings, model: str, prompt: str) -> RequestResult:
    """Stream one request and time its chunks. Never raises: failures are recorded."""
    result = RequestResult(start_time=time.time())
    chat = settings.endpoint == "chat"
    payload: dict[str, Any] = {"model": model, "max_tokens": settings.max_tokens, "stream": True,
                               "temperature": settings.temperature,
                               "stream_options": {"include_usage": True}}
    if settings.ignore_eos:
        payload["ignore_eos"] = True
    if chat:
        payload["messages"] = [{"role": "user", "content": prompt}]
    else:
        payload["prompt"] = prompt
    path = "/v1/chat/completions" if chat else "/v1/completions"
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    started = time.perf_counter()
    last = started
    chunks_with_content = 0
    usage = None
    text_parts = []
    try:
        async with client.stream("POST", settings.url.rstrip("/") + path, json=payload, headers=headers,
                                 timeout=settings.request_timeout) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                result.error = f"HTTP {response.status_code}: {_error_message(body)}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if not content:
                        continue
                    now = time.perf_counter()
                    if chunks_with_content == 0:
                        result.ttft = now - started
                    else:
                        result.itl.append(now - last)
                    result.token_times.append(time.time())
                    last = now
                    chunks_with_content += 1
                    text_parts.append(content)
        result.latency = time.perf_counter() - started
        result.generated_text = "".join(text_parts)
        result.output_tokens = usage["completion_tokens"] if usage else chunks_with_content
        result.prompt_len = usage["prompt_tokens"] if usage else 0
        if chunks_with_content == 0:
            result.error = "the response had no content"
        else:
            result.success = True
    except Exception as error:  # connection refused, timeout, broken stream: a finding, not a crash
        result.error = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        result.latency = time.perf_counter() - started
    return result


def _error_message(body: str) -> str:
    try:
        return json.loads(body)["error"]["message"][:200]
    except (ValueError, KeyError, TypeError):
        return body[:200]


# -- the run ------------------------------------------------------------------------------

def arrival_gaps(settings: LoadSettings, count: int) -> np.ndarray:
    if math.isinf(settings.rate):
        return np.zeros(count)
    rng = np.random.default_rng(settings.seed)
    theta = 1.0 / (settings.rate * settings.burstiness)
    return rng.gamma(shape=settings.burstiness, scale=theta, size=count)


async def _run(settings: LoadSettings, on_progress: Callable[[int, int], None]) -> tuple[list[RequestResult], float, str]:
    import httpx

    count = settings.num_requests if settings.num_requests is not None else (
        10**9 if settings.duration else 100)
    limits = httpx.Limits(max_connections=settings.max_concurrency or 1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(limits=limits, timeout=settings.request_timeout) as client:
        model = settings.model or await _first_model(client, settings)
        prompts = load_prompts(settings.dataset, min(count, 10_000) + settings.warmup, settings.seed)
        for index in range(settings.warmup):
            warm = await send_request(client, settings, model, prompts[index])
            if not warm.success:
                raise StageFailed(f"warm-up request failed: {warm.error}")
        prompts = prompts[settings.warmup:]
        semaphore = asyncio.Semaphore(settings.max_concurrency) if settings.max_concurrency else None
        gaps = arrival_gaps(settings, min(count, 10_000))
        done = 0

        async def one(prompt: str) -> RequestResult:
            nonlocal done
            try:
                result = await send_request(client, settings, model, prompt)
            finally:
                if semaphore is not None:
                    semaphore.release()
            done += 1
            on_progress(done, count)
            return result

        tasks = []
        start = time.perf_counter()
        for index in range(count):
            if semaphore is not None:
                await semaphore.acquire()  # the sender waits for a free slot: tasks stay bounded
            if settings.duration is not None and time.perf_counter() - start >= settings.duration:
                if semaphore is not None:
                    semaphore.release()
                break
            tasks.append(asyncio.create_task(one(prompts[index % len(prompts)])))
            gap = float(gaps[index % len(gaps)])
            if gap > 0:
                await asyncio.sleep(gap)
        if settings.duration is not None:
            count = len(tasks)
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    return results, duration, model


async def _first_model(client, settings: LoadSettings) -> str:
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    try:
        response = await client.get(settings.url.rstrip("/") + "/v1/models", headers=headers, timeout=10.0)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except Exception as error:
        raise StageFailed(f"{settings.url}: cannot list models ({type(error).__name__}: {error}); "
                          f"is the server up? (or give --model)") from None


def run_load(settings: LoadSettings, on_progress: Callable[[int, int], None] = lambda done, total: None) -> dict[str, Any]:
    """Run the load test and return the vLLM-style result dict (plus gate metrics)."""
    results, duration, model = asyncio.run(_run(settings, on_progress))
    return summarize(results, duration, settings, model)


def _stats(prefix: str, values_s: list[float]) -> dict[str, Optional[float]]:
    """Mean, median, std and percentiles in ms; None for each when there is no sample (a load test
    whose requests all failed measured no latency: it is not 0 ms)."""
    names = ([f"mean_{prefix}_ms", f"median_{prefix}_ms", f"std_{prefix}_ms"]
             + [f"p{p}_{prefix}_ms" for p in PERCENTILES])
    if not values_s:
        return dict.fromkeys(names)
    values = np.asarray(values_s, dtype=float) * 1000.0
    stats: dict[str, Optional[float]] = {f"mean_{prefix}_ms": float(values.mean()), f"median_{prefix}_ms": float(np.median(values)),
             f"std_{prefix}_ms": float(values.std())}
    for p in PERCENTILES:
        stats[f"p{p}_{prefix}_ms"] = float(np.percentile(values, p))
    return stats


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def summarize(results: list[RequestResult], duration: float, settings: LoadSettings, model: str) -> dict[str, Any]:
    good = [r for r in results if r.success]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in good if r.output_tokens > 1]
    itls = [gap for r in good for gap in r.itl]
    slo_seconds = {name: settings.goodput[name] / 1000.0 for name in SLO_NAMES if name in settings.goodput}

    def meets_slos(r: RequestResult) -> bool:
        tpot = (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
        measured = {"ttft": r.ttft, "tpot": tpot, "e2el": r.latency}
        return all(measured[name] <= limit for name, limit in slo_seconds.items())

    good_count = sum(1 for r in good if meets_slos(r))
    total_input = sum(r.prompt_len for r in good)
    total_output = sum(r.output_tokens for r in good)
    # output tokens per wall-clock second, from the content chunks' arrival times
    seconds = Counter(int(t) for r in good for t in r.token_times)
    starts = sorted((r.start_time, 1) for r in results) + sorted((r.start_time + r.latency, -1) for r in results)
    in_flight, max_in_flight = 0, 0
    for _, step in sorted(starts, key=lambda item: (item[0], item[1])):
        in_flight += step
        max_in_flight = max(max_in_flight, in_flight)
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": "openai-chat" if settings.endpoint == "chat" else "openai",
        "model_id": model,
        "num_prompts": len(results),
        "request_rate": "inf" if math.isinf(settings.rate) else settings.rate,
        "burstiness": settings.burstiness,
        "max_concurrency": settings.max_concurrency,
        "goodput_slos_ms": dict(settings.goodput),
        "duration": duration,
        "completed": len(good),
        "failed": len(results) - len(good),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(good) / duration,
        "request_goodput": good_count / duration,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
        "max_output_tokens_per_s": float(max(seconds.values(), default=0)),
        "max_concurrent_requests": max_in_flight,
    }
    result.update(_stats("ttft", [r.ttft for r in good]))
    result.update(_stats("tpot", tpots))
    result.update(_stats("itl", itls))
    result.update(_stats("e2el", [r.latency for r in good]))
    result.update({
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_tokens for r in results],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "latencies": [r.latency for r in results],
        "start_times": [r.start_time for r in results],
        "generated_texts": [r.generated_text for r in results],
        "errors": [r.error for r in results],
        "failure_reasons": dict(Counter(r.error for r in results if not r.success)),
    })
    result.update(gate_metrics(result))
    return result


def gate_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The metrics a plan gates on; a latency over zero samples is absent, with the reason."""
    total = result["completed"] + result["failed"]
    metrics = {
        "ttft_p95_ms": result["p95_ttft_ms"], "ttft_p99_ms": result["p99_ttft_ms"],
        "tpot_p95_ms": result["p95_tpot_ms"], "itl_p95_ms": result["p95_itl_ms"],
        "e2el_p99_ms": result["p99_e2el_ms"],
        "success_rate": result["completed"] / total if total else None,
        "output_tokens_per_second": result["output_throughput"],
    }
    unknown = {}
    for name, value in metrics.items():
        if value is None:
            if name == "success_rate":
                unknown[name] = "no request was sent"
            elif name in ("tpot_p95_ms", "itl_p95_ms") and result["completed"]:
                unknown[name] = "no completed request produced more than one token"
            else:
                unknown[name] = f"no request completed ({result['failed']} of {total} failed)"
    if unknown:
        metrics["unknown"] = unknown
    return metrics


def parse_goodput(items: list[str]) -> dict[str, float]:
    """["ttft:200", "e2el:500"] -> {"ttft": 200.0, "e2el": 500.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_NAMES:
            raise UserError(f"--goodput {item!r}: expected NAME:MS with NAME one of {', '.join(SLO_NAMES)}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise UserError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if slos[name] <= 0:
            raise UserError(f"--goodput {item!r}: the limit must be > 0 ms")
    return slos


def _check(settings: LoadSettings) -> None:
    if not settings.url.startswith(("http://", "https://")):
        raise UserError(f"url {settings.url!r} must start with http:// or https://")
    for name in ("rate", "burstiness", "max_tokens", "request_timeout"):
        if getattr(settings, name) <= 0:
            raise UserError(f"{name} must be > 0")
    for name in ("max_concurrency", "num_requests", "duration"):
        value = getattr(settings, name)
        if value is not None and value <= 0:
            raise UserError(f"{name} must be > 0")
    if settings.warmup < 0:
        raise UserError("warmup must be >= 0")
    if settings.duration and math.isinf(settings.rate) and not (settings.max_concurrency or settings.num_requests):
        raise UserError("a duration with no rate would send requests without end; give a rate, "
                        "a max concurrency or a number of requests")


def _api_key(variable: Optional[str]) -> Optional[str]:
    import os

    if not variable:
        return None
    key = os.environ.get(variable)
    if not key:
        raise UserError(f"api key variable {variable}: not set or empty")
    return key


# -- the stage kind `loadtest` ------------------------------------------------------------------

class LoadtestSettings(StageSettings):
    url: Optional[str] = None              # default: stages/<server_stage>/server.json
    server_stage: str = "serve"
    endpoint: Literal["chat", "completions"] = "chat"
    model: Optional[str] = None
    rate: Optional[float] = None           # None = all at once
    burstiness: float = 1.0
    max_concurrency: Optional[int] = None
    num_requests: Optional[int] = None
    duration: Optional[float] = None
    warmup: int = 2
    dataset: str = "synthetic"
    max_tokens: int = 64
    temperature: float = 0.0
    ignore_eos: bool = False
    goodput: dict[str, float] = {}
    api_key_env: Optional[str] = None
    request_timeout: float = 120.0
    time_limit_s: float = 900.0            # no new requests after this; bounds the stage
    seed: int = 0


def load_settings(settings: LoadtestSettings, url: str) -> LoadSettings:
    """The load test a stage's settings describe, against ``url``: UserError for what cannot run
    (checked by ``gonogo loadtest`` before its run directory exists, and by the stage)."""
    bad = [name for name in settings.goodput if name not in SLO_NAMES]
    if bad:
        raise UserError(f"goodput keys {bad} unknown; use {', '.join(SLO_NAMES)}")
    num_requests = settings.num_requests
    if num_requests is None and settings.duration is None:
        num_requests = 100
    load = LoadSettings(
        url=url, endpoint=settings.endpoint, model=settings.model,
        rate=math.inf if settings.rate is None else settings.rate, burstiness=settings.burstiness,
        max_concurrency=settings.max_concurrency, num_requests=num_requests,
        duration=min(settings.duration or math.inf, settings.time_limit_s), warmup=settings.warmup,
        dataset=settings.dataset, max_tokens=settings.max_tokens, temperature=settings.temperature,
        ignore_eos=settings.ignore_eos, goodput=dict(settings.goodput), api_key=_api_key(settings.api_key_env),
        request_timeout=settings.request_timeout, seed=settings.seed)
    _check(load)
    return load


def run(ctx, settings: LoadtestSettings) -> dict[str, Any]:
    url = settings.url
    if url is None:
        server_file = ctx.run_dir.stage_dir(settings.server_stage, create=False) / "server.json"
        if not server_file.is_file():
            raise StageFailed(f"no url given and no {server_file} (run the {settings.server_stage!r} serve stage "
                              f"first, or set url)")
        url = json.loads(server_file.read_text())["url"]
    try:
        load = load_settings(settings, url)
    except UserError as error:
        raise UserError(f"stage {ctx.name}: {error}") from None
    result = run_load(load, lambda done, total: ctx.progress(f"{done} requests done"))
    from gonogo.rundir import write_json_atomic

    write_json_atomic(ctx.stage_dir / RESULT_FILE, result)
    metrics = {name: result[name] for name in GATE_METRICS if name in result}
    metrics.update({name: result[name] for name in ("completed", "failed", "request_throughput")})
    if result.get("unknown"):
        metrics["unknown"] = result["unknown"]
    ctx.event(step=0, **{k: v for k, v in metrics.items() if k != "unknown"})
    return metrics


def report(stage_dir: Path, metrics: dict[str, Any]) -> list[ReportItem]:
    path = stage_dir / RESULT_FILE
    if not path.is_file():
        return []
    result = json.loads(path.read_text())
    rows = [{"metric": f"{name.upper()} (ms)",
             **{stat: None if result[f"{stat}_{name}_ms"] is None else round(result[f"{stat}_{name}_ms"], 1)
                for stat in ("mean", "median", "p90", "p95", "p99")}}
            for name in ("ttft", "tpot", "itl", "e2el")]
    text = (f"{result['completed']} completed, {result['failed']} failed in {result['duration']:.1f} s against "
            f"{result['model_id']}: {result['request_throughput']:.2f} req/s, goodput "
            f"{result['request_goodput']:.2f} req/s (SLOs {result['goodput_slos_ms'] or 'none'}), "
            f"{result['output_throughput']:.1f} output tokens/s.")
    if result["failure_reasons"]:
        text += " Failures: " + "; ".join(f"{n} × {r}" for r, n in result["failure_reasons"].items())
    return [ReportItem(title="Latency", table=rows), ReportItem(title="Throughput", text=text)]


# -- `gonogo loadtest`: the stage alone, through the plan runner -----------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="base URL of an OpenAI-compatible server")
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    parser.add_argument("--model", help="model id to request (default: the first the server lists)")
    parser.add_argument("--rate", type=float, default=math.inf, help="requests per second (default: all at once)")
    parser.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson arrivals")
    parser.add_argument("--max-concurrency", type=int, help="at most this many requests in flight")
    parser.add_argument("--num-requests", type=int, help="requests to send (default 100; unlimited with --duration)")
    parser.add_argument("--duration", type=float, help="stop sending new requests after S seconds")
    parser.add_argument("--time-limit", type=float, metavar="S",
                        help="no new requests after S seconds, whatever else is asked (default: --duration, else 900)")
    parser.add_argument("--warmup", type=int, default=2, help="requests sent first and not measured")
    parser.add_argument("--dataset", default="synthetic", help="'synthetic' (built-in reasoning corpus) or FILE.jsonl")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--ignore-eos", action="store_true",
                        help="ask for exactly --max-tokens tokens (vLLM's ignore_eos; for untrained models)")
    parser.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS", help="SLOs: ttft:MS tpot:MS e2el:MS")
    parser.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds one request may take")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the result (vLLM bench serve field names) here")
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory (default: runs/loadtest-<time>); the result is its "
                             f"stages/loadtest/{RESULT_FILE}")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    data: dict[str, Any] = {
        "url": args.url, "endpoint": args.endpoint, "burstiness": args.burstiness, "warmup": args.warmup,
        "dataset": args.dataset, "max_tokens": args.max_tokens, "temperature": args.temperature,
        "ignore_eos": args.ignore_eos, "goodput": parse_goodput(args.goodput),
        "request_timeout": args.request_timeout, "seed": args.seed}
    if args.rate != math.inf:  # all at once is the settings' None
        data["rate"] = args.rate
    for name in ("model", "max_concurrency", "num_requests", "duration", "api_key_env"):
        if getattr(args, name) is not None:
            data[name] = getattr(args, name)
    time_limit = args.time_limit if args.time_limit is not None else args.duration
    if time_limit is not None:
        data["time_limit_s"] = time_limit
    return data


def _check_flags(args: argparse.Namespace, settings: LoadtestSettings) -> None:
    """The flags, the API key, the prompts file and the --json file, before the run directory
    exists and before any request."""
    if settings.time_limit_s <= 0:
        raise UserError("--time-limit must be > 0")
    load_settings(settings, args.url)
    if settings.dataset != "synthetic":
        load_prompts(settings.dataset, 1, settings.seed)  # a missing or malformed file: one line, exit 2
    if args.json:
        from gonogo.files import check_output_file

        check_output_file(args.json, "--json")  # before the load test, so its result is not lost at the end


def _summary(args: argparse.Namespace, stage_dir: Path, metrics: Metrics) -> None:
    """The latency table and throughput on stdout; the result JSON copied to --json."""
    from rich.console import Console
    from rich.table import Table

    path = stage_dir / RESULT_FILE
    if not path.is_file():  # the stage failed before it measured (no server, a failed warm-up)
        return
    result = json.loads(path.read_text(encoding="utf-8"))
    console = Console()
    table = Table(title=f"load test of {args.url} ({result['model_id']})")
    for column in ("metric", "mean", "median", "p90", "p95", "p99"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for name in ("ttft", "tpot", "itl", "e2el"):
        table.add_row(f"{name.upper()} (ms)", *(_ms(result[f'{stat}_{name}_ms'])
                                                for stat in ("mean", "median", "p90", "p95", "p99")))
    console.print(table)
    console.print(f"completed {result['completed']}, failed {result['failed']} in {result['duration']:.1f} s; "
                  f"{result['request_throughput']:.2f} req/s, goodput {result['request_goodput']:.2f} req/s, "
                  f"{result['output_throughput']:.1f} output tok/s")
    for reason, count in result["failure_reasons"].items():
        console.print(f"  {count} × {reason}")
    if args.json:
        from gonogo.rundir import write_json_atomic

        write_json_atomic(args.json, result)
    console.print(f"result: {args.json or path}")


STAGE = StageKind(
    name="loadtest",
    description="load test an OpenAI-compatible server: TTFT/TPOT/ITL/E2EL percentiles, throughput, goodput",
    settings=LoadtestSettings,
    metrics=lambda settings: set(GATE_METRICS),
    run=run,
    report=report,
    devices=lambda settings: 0,
    # every request succeeded (what the command's exit code always meant); no request sent is unknown
    default_gates=lambda settings: ["success_rate == 1"],
    command=StageCommand(add_arguments=add_arguments, settings=_settings, check=_check_flags, summary=_summary),
)
