"""The rollout controller: steps, analysis per interval, promotion or rollback, webhooks, timeline.

The loop follows Flagger's scheduler. At each step the canary gets the step's share of traffic
for one interval while load flows; then the window is analysed (analysis.py). A failed analysis
adds one to the failed checks, which add up over the whole rollout, and holds the weight (the
same step is analysed again next interval); a passed one advances to the next step. When the
failed checks reach the threshold the canary is rolled back: weight 0, all traffic to stable,
and once its in-flight requests have finished (bounded) the canary is stopped. When the last
step (100 %) passes, the confirm-promotion webhook is asked, then the canary is promoted: the old
stable gets no new requests, is stopped once drained, and the canary takes its place.

Every wait is bounded: at most len(steps) + threshold intervals run before a decision.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from gonogo.rollout.analysis import (Analysis, analyze, measure_accuracy, quality_problems,
                                     results_dict, window_stats)
from gonogo.rollout.router import Router
from gonogo.typed_config import Strict

log = logging.getLogger(__name__)


class Webhooks(Strict):
    """HTTP POST hooks (Flagger's names). A non-2xx pre-rollout halts the rollout; a non-2xx
    confirm-promotion counts as a failed check; rollback is told, and its answer only logged."""

    pre_rollout: Optional[str] = None
    confirm_promotion: Optional[str] = None
    rollback: Optional[str] = None
    timeout_s: float = 5.0


def call_webhook(url: str, payload: dict[str, Any], timeout: float) -> tuple[bool, str]:
    """POST ``payload``; (True, "HTTP 200") on 2xx, else (False, why). Never raises."""
    import httpx

    try:
        response = httpx.post(url, json=payload, timeout=timeout)
    except httpx.HTTPError as error:
        return False, f"{type(error).__name__}: {error}"
    return 200 <= response.status_code < 300, f"HTTP {response.status_code}"


@dataclass
class Side:
    """A backend the controller may stop: ``stop`` is None for servers it only attached to."""

    url: str
    model: str
    stop: Optional[Callable[[], object]] = None
    chat: bool = False   # a finetuned (chat) model: the quality check asks it through the chat API


@dataclass
class Decision:
    promoted: bool = False
    rolled_back: bool = False
    halted: bool = False
    reason: str = ""
    failed_checks: int = 0
    time_to_decision_s: float = 0.0
    intervals: int = 0
    drained: bool = True
    timeline: list[dict[str, Any]] = field(default_factory=list)
    weights: list[dict[str, Any]] = field(default_factory=list)
    webhooks: list[dict[str, Any]] = field(default_factory=list)
    stable_accuracy: Optional[float] = None


class Controller:
    def __init__(self, router: Router, router_url: str, stable: Side, canary: Side, analysis: Analysis, *,
                 webhooks: Optional[Webhooks] = None, drain_timeout: float = 30.0, name: str = "canary",
                 on_event: Callable[..., None] = lambda **fields: None,
                 on_progress: Callable[[str], None] = lambda text: None):
        self.router = router
        self.router_url = router_url
        self.stable = stable
        self.canary = canary
        self.analysis = analysis
        self.webhooks = webhooks or Webhooks()
        self.drain_timeout = drain_timeout
        self.name = name
        self.on_event = on_event
        self.on_progress = on_progress
        self.decision = Decision()
        self._started = 0.0

    # -- helpers ------------------------------------------------------------------------------
    def _now(self) -> float:
        return time.monotonic() - self._started

    def _set_weight(self, weight: int) -> None:
        self.router.set_weight(weight)
        self.decision.weights.append({"t": self._now(), "weight": weight})
        self.on_event(weight=weight, failed_checks=self.decision.failed_checks)

    def _hook(self, phase: str, url: Optional[str]) -> bool:
        if not url:
            return True
        ok, status = call_webhook(url, {"name": self.name, "phase": phase, "weight": self.router.weight,
                                        "failed_checks": self.decision.failed_checks,
                                        "stable": self.stable.url, "canary": self.canary.url},
                                  self.webhooks.timeout_s)
        self.decision.webhooks.append({"t": self._now(), "phase": phase, "url": url, "ok": ok, "status": status})
        log.info("webhook %s %s: %s", phase, url, status)
        return ok

    def _accuracy(self, side: Side, name: str, problems) -> tuple[Optional[float], int]:
        if not self.analysis.thresholds.needs_quality:
            return None, 0
        return measure_accuracy(self.router_url, name, side.model, problems,
                                max_tokens=self.analysis.quality_max_tokens,
                                concurrency=self.analysis.quality_concurrency,
                                chat=side.chat if self.analysis.quality_format == "auto"
                                else self.analysis.quality_format == "chat")

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> Decision:
        self._started = time.monotonic()
        decision = self.decision
        analysis = self.analysis
        problems = quality_problems(analysis) if analysis.thresholds.needs_quality else []
        if not self._hook("pre-rollout", self.webhooks.pre_rollout):
            decision.halted = True
            self._rollback("the pre-rollout webhook refused")
            return self._finish()
        decision.stable_accuracy, _ = self._accuracy(self.stable, "stable", problems)
        step = 0
        self._set_weight(analysis.steps[0])
        # bounded: each interval either advances a step or adds a failed check
        for _ in range(len(analysis.steps) + analysis.threshold + 1):
            weight = analysis.steps[step]
            self.on_progress(f"canary at {weight}% (failed checks {decision.failed_checks}/{analysis.threshold})")
            window_start = time.monotonic()
            time.sleep(analysis.interval_s)
            accuracy, quality_errors = self._accuracy(self.canary, "canary", problems)
            window_end = time.monotonic()
            records = self.router.records(window_start, window_end)
            canary_stats = window_stats([r for r in records if r.side == "canary"])
            stable_stats = window_stats([r for r in records if r.side == "stable"])
            # the ratio compares sides within the same window (same load, same machine state); at 100 %
            # stable has no traffic and the ratio check stands aside
            results = analyze(canary_stats, stable_stats, analysis.thresholds, accuracy=accuracy,
                              stable_accuracy=decision.stable_accuracy, ratio_floor_ms=analysis.ratio_floor_ms)
            passed = all(result.passed for result in results)
            if not passed:
                decision.failed_checks += 1
            decision.intervals += 1
            entry: dict[str, Any] = {"t": self._now(), "step": step, "weight": weight, "passed": passed,
                     "failed_checks": decision.failed_checks, "canary": asdict(canary_stats),
                     "stable": asdict(stable_stats), "accuracy": accuracy,
                     "stable_accuracy": decision.stable_accuracy, "quality_errors": quality_errors,
                     "checks": results_dict(results)}
            decision.timeline.append(entry)
            self.on_event(weight=weight, passed=passed, failed_checks=decision.failed_checks,
                          canary_success_rate=canary_stats.success_rate, canary_e2el_p99_ms=canary_stats.e2el_p99_ms,
                          canary_ttft_p99_ms=canary_stats.ttft_p99_ms, accuracy=accuracy)
            if not passed:
                failing = "; ".join(f"{r.name}: {r.reason}" for r in results if not r.passed)
                log.warning("canary at %d%%: failed check %d/%d (%s)", weight, decision.failed_checks,
                            analysis.threshold, failing)
                if decision.failed_checks >= analysis.threshold:
                    self._rollback(f"failed checks reached {analysis.threshold} at {weight}% ({failing})")
                    return self._finish()
                continue
            if step < len(analysis.steps) - 1:
                step += 1
                self._set_weight(analysis.steps[step])
                continue
            if not self._hook("confirm-promotion", self.webhooks.confirm_promotion):
                decision.failed_checks += 1
                entry["checks"].append({"name": "confirm-promotion", "value": None, "threshold": 1,
                                        "passed": False, "reason": "webhook refused"})
                if decision.failed_checks >= analysis.threshold:
                    self._rollback("the confirm-promotion webhook refused")
                    return self._finish()
                continue
            self._promote()
            return self._finish()
        self._rollback("no decision within the bounded number of intervals")  # pragma: no cover - bound
        return self._finish()

    def _rollback(self, reason: str) -> None:
        log.warning("rolling back the canary: %s", reason)
        self.decision.rolled_back = True
        self.decision.reason = reason
        self.router.detach("canary")   # weight 0: new requests go to stable
        self.decision.weights.append({"t": self._now(), "weight": 0})
        self.on_event(weight=0, rolled_back=True, failed_checks=self.decision.failed_checks)
        self.decision.drained = self.router.wait_drained("canary", self.drain_timeout)
        if self.canary.stop is not None:
            self.canary.stop()
        self._hook("rollback", self.webhooks.rollback)

    def _promote(self) -> None:
        log.info("promoting the canary")
        self.decision.promoted = True
        self.decision.reason = f"passed every step ({', '.join(map(str, self.analysis.steps))} %)"
        self.router.detach("stable")   # weight is 100: the old stable only finishes what it has
        self.decision.drained = self.router.wait_drained("stable", self.drain_timeout)
        if self.stable.stop is not None:
            self.stable.stop()
        self.router.promote()
        self.on_event(weight=100, promoted=True, failed_checks=self.decision.failed_checks)

    def _finish(self) -> Decision:
        self.decision.time_to_decision_s = self._now()
        return self.decision
