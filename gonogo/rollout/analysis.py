"""Canary analysis: thresholds, per-window statistics and the checks (after Flagger's and Argo's).

Every interval the controller hands the canary's window (the requests that finished on the
canary during that interval, quality probes excluded), the stable side's window, and the
accuracies to ``analyze``. It returns one result per check. A window without canary requests is
a failed check ("no data"), as in Flagger: silence must never pass for health.

Checks (each optional but the success rate; all over the same window):

    success_rate     canary requests that did not fail (non-5xx, stream complete) / all    >= min
    ttft_p99_ms      the canary's p99 time to first token                                  <= max
    e2el_p99_ms      the canary's p99 end-to-end latency                                    <= max
    latency_ratio    canary p99 / stable p99, for TTFT and E2EL (the larger one)           <= max
    accuracy         the canary's exact-match accuracy on the held-out quality set         >= min
    accuracy_drop    stable's accuracy − the canary's, same set                             <= max
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Literal, Any, Optional, Sequence

from pydantic import Field, field_validator

from gonogo.errors import UserError
from gonogo.rollout.router import RequestRecord
from gonogo.typed_config import Strict

# metric name -> (direction, meaning); the names a threshold table may use
CHECKS = {
    "success_rate": ("min", "share of canary requests that succeeded (0..1)"),
    "ttft_p99_ms": ("max", "canary p99 time to first token, ms"),
    "e2el_p99_ms": ("max", "canary p99 end-to-end latency, ms"),
    "latency_ratio": ("max", "canary p99 / stable p99 (TTFT and E2EL), >= 1"),
    "accuracy": ("min", "canary exact-match accuracy on held-out prompts (0..1)"),
    "accuracy_drop": ("max", "stable accuracy minus canary accuracy (0..1)"),
}


class Thresholds(Strict):
    """The bounds each check must meet; None turns a check off. Unknown names are errors."""

    success_rate: Optional[float] = Field(0.99, ge=0.0, le=1.0)
    ttft_p99_ms: Optional[float] = Field(None, gt=0)
    e2el_p99_ms: Optional[float] = Field(None, gt=0)
    latency_ratio: Optional[float] = Field(None, ge=1.0)
    accuracy: Optional[float] = Field(None, ge=0.0, le=1.0)
    accuracy_drop: Optional[float] = Field(None, ge=0.0, le=1.0)

    def active(self) -> dict[str, float]:
        return {name: value for name, value in self.model_dump().items() if value is not None}

    @property
    def needs_quality(self) -> bool:
        return self.accuracy is not None or self.accuracy_drop is not None


QUALITY_CONCURRENCY = 16  # quality prompts in flight at once by default: an engine's batch


class Analysis(Strict):
    """How the rollout advances: steps (percent), interval per step, failed checks allowed."""

    steps: list[int] = Field(default_factory=lambda: [10, 25, 50, 100])
    interval_s: float = Field(10.0, gt=0)
    threshold: int = Field(2, ge=1)          # failed checks (cumulative) that trigger the rollback
    thresholds: Thresholds = Field(default_factory=Thresholds)
    quality_prompts: int = Field(8, ge=0)    # held-out problems asked of the canary at each step
    quality_seed: int = 0
    quality_max_tokens: int = Field(64, ge=1)
    # quality prompts in flight at once: an engine's batch (16 rows by default) keeps a production
    # canary's probe to one batch; the canary drill asks half of that, so its own traffic still
    # finds a free row
    quality_concurrency: int = Field(QUALITY_CONCURRENCY, ge=1)
    # how the quality prompts are asked: "auto" = the chat API for a server gonogo started from a
    # finetuned (chat) checkpoint, plain completions otherwise; "chat" / "text" force one
    quality_format: Literal["auto", "chat", "text"] = "auto"
    # in the latency ratio, a p99 below this counts as this: a 20 ms → 60 ms wobble of a fast
    # server is noise, not a 3× regression
    ratio_floor_ms: float = Field(50.0, ge=0)

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: list[int]) -> list[int]:
        if not steps:
            raise ValueError("steps must not be empty (for example 10,25,50,100)")
        if any(not 0 < step <= 100 for step in steps):
            raise ValueError("every step is a canary weight in percent, 1..100")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError("the weights must increase step by step")
        if steps[-1] != 100:
            raise ValueError("the last step must be 100 (promotion sends all traffic to the canary)")
        return steps


def check_consistent(analysis: Analysis, source: str) -> None:
    """Contradictions between fields that pydantic's per-field bounds cannot see; one line each."""
    if not analysis.thresholds.active():
        raise UserError(f"{source}: every check is turned off; give at least one threshold")
    if analysis.thresholds.needs_quality and analysis.quality_prompts == 0:
        raise UserError(f"{source}: an accuracy threshold is set but quality_prompts is 0, so nothing "
                        f"would be measured; ask at least one prompt or drop the accuracy thresholds")


def parse_check(text: str) -> tuple[str, float]:
    """``name=value`` (a --check flag) -> (name, value); unknown names are a one-line error."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep:
        raise UserError(f"--check {text!r}: expected NAME=VALUE, e.g. ttft_p99_ms=500")
    if name not in CHECKS:
        raise UserError(f"--check {text!r}: unknown metric {name!r}; known: {', '.join(CHECKS)}")
    try:
        return name, float(raw)
    except ValueError:
        raise UserError(f"--check {text!r}: {raw!r} is not a number") from None


# -- windows ------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """Linear-interpolated percentile (numpy's default), None for no data."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class WindowStats:
    requests: int = 0
    failures: int = 0
    success_rate: Optional[float] = None
    ttft_p99_ms: Optional[float] = None
    e2el_p99_ms: Optional[float] = None
    e2el_p50_ms: Optional[float] = None


def window_stats(records: Sequence[RequestRecord]) -> WindowStats:
    records = [r for r in records if not r.pinned]
    if not records:
        return WindowStats()
    good = [r for r in records if r.ok]
    ttfts = [1000 * r.ttft for r in good if r.ttft is not None]
    latencies = [1000 * r.latency for r in good]
    return WindowStats(requests=len(records), failures=len(records) - len(good),
                       success_rate=len(good) / len(records),
                       ttft_p99_ms=percentile(ttfts, 99), e2el_p99_ms=percentile(latencies, 99),
                       e2el_p50_ms=percentile(latencies, 50))


@dataclass
class CheckResult:
    name: str
    value: Optional[float]
    threshold: float
    passed: bool
    reason: str = ""


def analyze(canary: WindowStats, stable: Optional[WindowStats], thresholds: Thresholds, *,
            accuracy: Optional[float] = None, stable_accuracy: Optional[float] = None,
            ratio_floor_ms: float = 0.0) -> list[CheckResult]:
    """One result per active check; ``stable`` is the stable side's window (the same interval)."""
    results = []
    if canary.requests == 0:
        # Flagger: no data is a failure, whatever the thresholds
        results.append(CheckResult("requests", 0, 1, False, "no canary requests in the window"))
    for name, bound in thresholds.active().items():
        direction = CHECKS[name][0]
        value: Optional[float]
        reason = ""
        if name == "success_rate":
            value = canary.success_rate
        elif name == "ttft_p99_ms":
            value = canary.ttft_p99_ms
        elif name == "e2el_p99_ms":
            value = canary.e2el_p99_ms
        elif name == "latency_ratio":
            value, reason = _latency_ratio(canary, stable, ratio_floor_ms)
            if value is None and reason.startswith("no stable"):
                results.append(CheckResult(name, None, bound, True, reason))  # nothing to compare against yet
                continue
        elif name == "accuracy":
            value = accuracy
        else:  # accuracy_drop
            value = None if accuracy is None or stable_accuracy is None else stable_accuracy - accuracy
        if value is None:
            results.append(CheckResult(name, None, bound, False, reason or "no data"))
            continue
        passed = value >= bound if direction == "min" else value <= bound
        results.append(CheckResult(name, value, bound, passed,
                                   "" if passed else f"{value:.4g} {'<' if direction == 'min' else '>'} {bound:g}"))
    return results


def _latency_ratio(canary: WindowStats, stable: Optional[WindowStats], floor_ms: float) -> tuple[Optional[float], str]:
    if stable is None or stable.e2el_p99_ms is None:
        return None, "no stable traffic in the window to compare with"
    if canary.e2el_p99_ms is None:
        return None, "no successful canary request"
    pairs = [(canary.e2el_p99_ms, stable.e2el_p99_ms)]
    if canary.ttft_p99_ms is not None and stable.ttft_p99_ms is not None:
        pairs.append((canary.ttft_p99_ms, stable.ttft_p99_ms))
    return max(max(c, floor_ms) / max(s, floor_ms, 1e-6) for c, s in pairs), ""


def results_dict(results: Sequence[CheckResult]) -> list[dict[str, Any]]:
    return [asdict(result) for result in results]


# -- the quality check ----------------------------------------------------------------------

def quality_problems(analysis: Analysis):
    """The fixed held-out set asked at every step (same problems for stable and canary)."""
    from gonogo.data.synthetic import generate

    return generate("heldout", analysis.quality_seed, analysis.quality_prompts)


def measure_accuracy(router_url: str, side: str, model: str, problems, *, max_tokens: int,
                     timeout: float = 30.0, headers: Optional[dict[str, str]] = None,
                     chat: bool = False, concurrency: int = QUALITY_CONCURRENCY) -> tuple[Optional[float], int]:
    """Greedy exact-match accuracy of ``side`` (pinned through the router) -> (accuracy, errors).

    A chat (finetuned) model is asked the question through /v1/chat/completions, a pretrained one
    is given the corpus's own text through /v1/completions: each in the form it was trained on.

    A request that fails counts as a wrong answer (and as an error): a broken canary must not pass
    the quality check by failing to answer.
    """
    import httpx

    from gonogo.data.synthetic import verify
    from gonogo.rollout.router import ROUTE_HEADER

    from concurrent.futures import ThreadPoolExecutor

    request_headers = {**(headers or {}), ROUTE_HEADER: side}

    def ask(client: "httpx.Client", problem) -> Optional[bool]:
        """True/False for a right/wrong answer, None for a failed request."""
        try:
            if chat:
                response = client.post(f"{router_url}/v1/chat/completions", headers=request_headers, json={
                    "model": model, "messages": [{"role": "user", "content": problem.question}],
                    "max_tokens": max_tokens, "temperature": 0.0})
            else:
                response = client.post(f"{router_url}/v1/completions", headers=request_headers, json={
                    "model": model, "prompt": problem.prompt, "max_tokens": max_tokens, "temperature": 0.0})
            if response.status_code != 200:
                return None
            choice = response.json()["choices"][0]
            return verify(problem, choice["message"]["content"] if chat else choice["text"])
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            return None

    # asked together, ``concurrency`` at a time: a slow canary costs one latency per that many
    # prompts, not one per prompt (at 4 at a time, the laptop plan's latency drill, whose 48 prompts
    # each wait 1.5 s, took 44 s of the canary-degraded stage's 76 s)
    with httpx.Client(timeout=timeout) as client, \
            ThreadPoolExecutor(max_workers=min(concurrency, max(len(problems), 1))) as pool:
        answers = list(pool.map(lambda problem: ask(client, problem), problems))
    correct = sum(1 for answer in answers if answer)
    errors = sum(1 for answer in answers if answer is None)
    return (correct / len(problems) if problems else None), errors  # no prompt asked: nothing measured


def quality_main(argv: Optional[Sequence[str]] = None) -> int:
    """The quality check as a command (the Kubernetes form runs it as a Flagger loadtester ``cmd``
    or an Argo Job): exit 0 when the canary passes, 1 when it fails, 2 on a usage error."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m gonogo.rollout.analysis",
                                     description="canary quality check: exact-match accuracy on held-out problems")
    parser.add_argument("--canary", required=True, help="canary server URL")
    parser.add_argument("--stable", help="stable server URL (for --max-accuracy-drop)")
    parser.add_argument("--model", default="gonogo")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--min-accuracy", type=float)
    parser.add_argument("--max-accuracy-drop", type=float)
    args = parser.parse_args(argv)
    if args.max_accuracy_drop is not None and not args.stable:
        print("--max-accuracy-drop needs --stable", file=sys.stderr)
        return 2
    analysis = Analysis(quality_prompts=args.prompts, quality_seed=args.seed, quality_max_tokens=args.max_tokens)
    problems = quality_problems(analysis)
    accuracy, _ = measure_accuracy(args.canary.rstrip("/"), "canary", args.model, problems, max_tokens=args.max_tokens)
    stable_accuracy = None
    if args.stable:
        stable_accuracy, _ = measure_accuracy(args.stable.rstrip("/"), "stable", args.model, problems,
                                              max_tokens=args.max_tokens)
    passed = True
    if args.min_accuracy is not None:
        passed &= accuracy is not None and accuracy >= args.min_accuracy
    if args.max_accuracy_drop is not None:
        # a side that answered nothing measured no accuracy: no drop can be shown to be within the limit
        passed &= (accuracy is not None and stable_accuracy is not None
                   and stable_accuracy - accuracy <= args.max_accuracy_drop)
    print(json.dumps({"accuracy": accuracy, "stable_accuracy": stable_accuracy, "passed": passed}))
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(quality_main())
