"""Gates and assumptions: ``metric op value`` expressions over the metrics a stage wrote.

A gate blocks: if it fails, the plan's verdict is NO-GO. An assumption does not block: it is a
hypothesis of the assumptions register that ends validated, refuted or untested, with the
measured value beside it. A metric the stage did not produce fails its gate; it never passes.

A stage that could not measure something leaves the metric out (or None) and may say why under
the ``unknown`` key of its metrics: ``{"unknown": {"ecc_errors": "NVML not available: ..."}}``.
The gate then fails as "not measured: <why>", and an assumption on it stays untested with that reason.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from gonogo.typed_config import parse_scalar

OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}

# a metric name: letters, digits, _ . @ - (maj@8, pass@1, all_reduce_busbw_GBps, stage.metric)
_METRIC = r"[A-Za-z_][A-Za-z0-9_.@\-]*"
_GATE = re.compile(rf"^\s*({_METRIC})\s*(<=|>=|==|!=|<|>)\s*([^<>=!\s].*?)\s*$")
_CONDITION = re.compile(r"^\s*(<=|>=|==|!=|<|>)\s*([^<>=!\s].*?)\s*$")


class ExpressionError(ValueError):
    """A gate or assumption that does not parse; the message says what is wrong."""


@dataclass(frozen=True)
class Condition:
    op: str
    value: Any

    def holds(self, measured: Any) -> bool:
        """Whether ``measured op value`` is true. Type mismatches and NaN are never true."""
        value = self.value
        if isinstance(value, bool) or isinstance(measured, bool):
            if not (isinstance(value, bool) and isinstance(measured, bool)):
                return False
            if self.op not in ("==", "!="):
                return False
        elif isinstance(value, (int, float)):
            if not isinstance(measured, (int, float)) or isinstance(measured, bool):
                return False
            if isinstance(measured, float) and math.isnan(measured):
                return False
        elif isinstance(value, str):
            if not isinstance(measured, str):
                return False
            if self.op not in ("==", "!="):
                return False
        return bool(OPERATORS[self.op](measured, value))

    def __str__(self) -> str:
        return f"{self.op} {format_value(self.value)}"


@dataclass(frozen=True)
class Gate:
    metric: str
    condition: Condition
    text: str

    def evaluate(self, metrics: dict[str, Any]) -> "GateResult":
        if self.metric not in metrics or metrics[self.metric] is None:
            why = unknown_reason(metrics, self.metric)
            return GateResult(self, None, False, f"not measured: {why}" if why else "not measured")
        measured = metrics[self.metric]
        passed = self.condition.holds(measured)
        return GateResult(self, measured, passed, "" if passed else "failed")


UNKNOWN_KEY = "unknown"


def unknown_reason(metrics: dict[str, Any], metric: str) -> str:
    """Why a stage could not measure ``metric`` ("" when it did not say)."""
    reasons = metrics.get(UNKNOWN_KEY)
    if isinstance(reasons, dict) and reasons.get(metric):
        return str(reasons[metric])
    return ""


@dataclass(frozen=True)
class GateResult:
    gate: Gate
    measured: Any
    passed: bool
    reason: str


def _parse_value(raw: str) -> Any:
    value = parse_scalar(raw)
    if isinstance(value, (dict, list)):
        raise ExpressionError(f"value {raw!r} must be a number, a boolean or a string")
    if hasattr(value, "isoformat"):  # TOML dates/times are not gate values
        return raw
    return value


def parse_gate(text: str) -> Gate:
    if not isinstance(text, str):
        raise ExpressionError(f"a gate must be a string like \"val_loss <= 2.2\", got {text!r}")
    match = _GATE.match(text)
    if not match:
        raise ExpressionError(
            f"gate {text!r} is not 'metric op value' (op one of {' '.join(OPERATORS)}; "
            f"for example \"val_loss <= 2.2\")")
    metric, op, raw = match.groups()
    return Gate(metric, Condition(op, _parse_value(raw)), text.strip())


def parse_condition(text: Any) -> Condition:
    """An assumption's hypothesis: ``">= 10"``; a bare number or boolean means ``==``."""
    if isinstance(text, bool) or isinstance(text, (int, float)):
        return Condition("==", text)
    if not isinstance(text, str):
        raise ExpressionError(f"hypothesis {text!r} must be a string like \">= 10\"")
    match = _CONDITION.match(text)
    if not match:
        raise ExpressionError(
            f"hypothesis {text!r} is not 'op value' (op one of {' '.join(OPERATORS)}; for example \">= 10\")")
    op, raw = match.groups()
    return Condition(op, _parse_value(raw))


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.4g}"
        return f"{value:.4f}".rstrip("0").rstrip(".")
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


@dataclass(frozen=True)
class Assumption:
    key: str            # as written in [assumptions]
    metric: str         # the metric name
    stage: Optional[str]  # a stage name when the key is "stage.metric"
    condition: Condition
    text: str
    note: str = ""      # where the hypothesis comes from (e.g. "procurement checklist")

    def evaluate(self, measured: Any, source: Optional[str], why_unknown: str = "") -> dict[str, Any]:
        if measured is None:
            status = "untested"
        else:
            status = "validated" if self.condition.holds(measured) else "refuted"
            why_unknown = ""
        return {
            "key": self.key,
            "hypothesis": f"{self.metric} {self.condition}",
            "measured": measured,
            "source_stage": source,
            "status": status,
            "note": self.note,
            "reason": why_unknown,
        }
