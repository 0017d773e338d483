"""A plan: ordered stages with gates, an assumptions register and a device-hour budget.

Loading a plan validates all of it before anything runs: every stage's kind and settings, every
gate and assumption against the metrics the stage kinds declare, duplicate names. A problem is
one line naming the file (and line, where it can be found) and the reason; exit code 2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from pydantic import Field, field_validator

from gonogo.errors import UserError
from gonogo.gates import Assumption, ExpressionError, Gate, parse_condition, parse_gate
from gonogo.stages import get_kind
from gonogo.stages.base import StageKind, StageSettings
from gonogo.typed_config import PLANS_DIR, Strict, load_toml, resolve_preset, validate

DEFAULT_PLAN = "laptop"
RUNNER_KEYS = {"name", "kind", "gates", "continue_on_fail", "description"}
# metrics the runner itself measures for the whole plan (usable in [assumptions])
PLAN_METRICS = {"device_hours", "wall_seconds", "cost", "budget_used_fraction"}
# metrics the runner adds to every stage's metrics
STAGE_RUNNER_METRICS = {"stage_wall_seconds", "stage_device_hours"}


class PlanHeader(Strict):
    name: str = "plan"
    description: str = ""
    budget_device_hours: Optional[float] = Field(default=None, gt=0)
    requires_gpus: int = Field(default=0, ge=0)   # CUDA GPUs the plan needs; checked before anything runs
    # cost alarms (gonogo.budget): money = device-hours x price; the tighter budget is the kill
    price_per_device_hour: Optional[float] = Field(default=None, ge=0)
    budget_money: Optional[float] = Field(default=None, gt=0)
    currency: str = "USD"
    budget_alarm_fraction: float = Field(default=0.8, gt=0, lt=1)
    # what `gonogo run PLAN name=value ...` must give: name -> what it is; ${name} in any value is replaced
    parameters: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name_stays_under_runs(cls, name: str) -> str:
        # the run directory is runs/<name>-<time>: a separator or '..' would put it elsewhere
        from gonogo.names import check_path_component

        try:
            return check_path_component(name, "plan name")
        except UserError as error:
            raise ValueError(str(error)) from None


@dataclass
class Stage:
    name: str
    kind: StageKind
    settings: StageSettings
    gates: list[Gate]
    continue_on_fail: bool
    description: str
    raw: dict[str, Any]

    @property
    def metrics(self) -> set[str]:
        return set(self.kind.metrics(self.settings)) | STAGE_RUNNER_METRICS


@dataclass
class Plan:
    header: PlanHeader
    stages: list[Stage]
    assumptions: list[Assumption]
    path: Path
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.header.name

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def assumption_source(self, assumption: Assumption) -> Optional[str]:
        """The stage whose metric an assumption reads (the last one producing it), or None for plan metrics."""
        if assumption.stage is not None:
            return assumption.stage
        for stage in reversed(self.stages):
            if assumption.metric in stage.metrics:
                return stage.name
        return None


def _line_of(text: str, needle: str) -> str:
    """``:LINE`` of the first line containing ``needle`` (for error messages), or ''."""
    for number, line in enumerate(text.splitlines(), start=1):
        if needle and needle in line:
            return f":{number}"
    return ""


def resolve_plan_path(plan: Optional[str]) -> Path:
    return resolve_preset(plan or DEFAULT_PLAN, directory=PLANS_DIR, what="plan")


_PARAMETER = re.compile(r"\$\{([^}]*)\}")


def parse_parameters(items: Sequence[str]) -> dict[str, str]:
    """``name=value`` words of the command line -> {name: value} (UserError for anything else)."""
    parameters: dict[str, str] = {}
    for item in items:
        name, equals, value = item.partition("=")
        if not equals or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise UserError(f"{item!r}: plan parameters are name=value (e.g. model=/path/to/model)")
        if name in parameters:
            raise UserError(f"parameter {name!r} is given twice")
        parameters[name] = value
    return parameters


def substitute_parameters(data: dict, given: dict[str, str], source: str) -> dict:
    """``data`` with every ``${name}`` in a string value replaced by its parameter's value.

    The plan declares its parameters in ``[plan] parameters``; a parameter it does not declare, a
    ``${name}`` it does not declare, or a declared one that is used but not given is a UserError.
    A value that names an existing file or directory is made absolute (the plan's own relative
    paths are relative to the plan; the user's are relative to where they typed the command).
    """
    declared = (data.get("plan") or {}).get("parameters") or {}
    if not isinstance(declared, dict):
        raise UserError(f"{source}: [plan] parameters must be a table of name = \"what it is\"")
    unknown = sorted(set(given) - set(declared))
    if unknown:
        takes = f"its parameters are {', '.join(sorted(declared))}" if declared else "it takes none"
        raise UserError(f"{source}: the plan has no parameter {unknown[0]!r}; {takes}")
    values = {name: str(Path(value).resolve()) if value and Path(value).exists() else value
              for name, value in given.items()}

    def replace(match: "re.Match[str]") -> str:
        name = match.group(1)
        if name not in declared:
            raise UserError(f"{source}: ${{{name}}} is used but [plan] parameters does not declare {name!r}")
        if name not in values:
            usage = " ".join(f"{key}=..." for key in sorted(declared))
            raise UserError(f"{source}: the plan needs parameter {name!r} ({declared[name]}); "
                            f"give it on the command line: gonogo run PLAN {usage}")
        return values[name]

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            return _PARAMETER.sub(replace, value)
        if isinstance(value, list):
            return [walk(item) for item in value]
        if isinstance(value, dict):
            return {key: walk(item) for key, item in value.items()}
        return value

    header = data.get("plan")
    result = walk({key: value for key, value in data.items() if key != "plan"})
    if header is not None:
        result["plan"] = header
    return result


def load_plan(path: Path, parameters: Optional[dict[str, str]] = None) -> Plan:
    path = Path(path)
    data = substitute_parameters(load_toml(path), parameters or {}, str(path))
    text = path.read_text(encoding="utf-8")
    source = str(path)

    unknown_tables = set(data) - {"plan", "stage", "assumptions"}
    if unknown_tables:
        bad = sorted(unknown_tables)[0]
        raise UserError(f"{source}{_line_of(text, bad)}: unknown table {bad!r}; a plan has [plan], [[stage]] and [assumptions]")
    header = validate(PlanHeader, data.get("plan", {}), f"{source} [plan]")
    if header.budget_money is not None and not header.price_per_device_hour:
        raise UserError(f"{source}{_line_of(text, 'budget_money')} [plan]: budget_money needs a price_per_device_hour "
                        f"above 0 (money per device-hour, e.g. 2.5) to turn the device-hours stages use into money")
    raw_stages = data.get("stage", [])
    if not isinstance(raw_stages, list) or not raw_stages:
        raise UserError(f"{source}: a plan needs at least one [[stage]] table")

    stages: list[Stage] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_stages, start=1):
        where = f"{source} stage #{index}"
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"{where}: missing 'name' (a short word, e.g. name = \"pretrain\")")
        if not all(c.isalnum() or c in "-_" for c in name):
            raise UserError(f"{where}: name {name!r} may only have letters, digits, '-' and '_'")
        where = f"{source}{_line_of(text, repr(name)[1:-1])} stage {name!r}"
        if name in seen:
            raise UserError(f"{where}: duplicate stage name {name!r}; every stage needs its own name")
        seen.add(name)
        kind_name = raw.get("kind")
        if not isinstance(kind_name, str):
            raise UserError(f"{where}: missing 'kind'")
        try:
            kind = get_kind(kind_name)
        except UserError as error:
            raise UserError(f"{where}: {error}") from None
        settings_data = {k: v for k, v in raw.items() if k not in RUNNER_KEYS}
        settings = validate(kind.settings, settings_data, where)
        gates_raw = raw.get("gates", [])
        if not isinstance(gates_raw, list):
            raise UserError(f"{where}: 'gates' must be a list of strings like [\"val_loss <= 2.2\"]")
        continue_on_fail = raw.get("continue_on_fail", False)
        if not isinstance(continue_on_fail, bool):
            raise UserError(f"{where}: 'continue_on_fail' must be true or false, got {continue_on_fail!r}")
        for key, value in _string_values(settings_data):
            if value.startswith("@") and value[1:] not in seen - {name}:
                raise UserError(f"{source}{_line_of(text, value)} stage {name!r}: {key} = {value!r} refers to "
                                f"no earlier stage; '@name' means the model an earlier stage of this plan produced")
        stage = Stage(name, kind, settings, [], continue_on_fail, str(raw.get("description", "")), raw)
        produced = stage.metrics
        for gate_text in gates_raw:
            line = _line_of(text, str(gate_text))
            try:
                gate = parse_gate(gate_text)
            except ExpressionError as error:
                raise UserError(f"{source}{line} stage {name!r}: {error}") from None
            if gate.metric not in produced:
                raise UserError(
                    f"{source}{line} stage {name!r}: gate {gate.text!r} uses unknown metric {gate.metric!r}; "
                    f"kind {kind.name!r} produces: {', '.join(sorted(produced))}")
            stage.gates.append(gate)
        stages.append(stage)

    assumptions = _load_assumptions(data.get("assumptions", {}), stages, source, text)
    return Plan(header, stages, assumptions, path, data)


def _string_values(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Every string value in nested settings, with its dotted key."""
    if isinstance(data, str):
        return [(prefix, data)]
    if isinstance(data, dict):
        return [item for key, value in data.items() for item in _string_values(value, f"{prefix}.{key}".lstrip("."))]
    if isinstance(data, list):
        return [item for index, value in enumerate(data) for item in _string_values(value, f"{prefix}[{index}]")]
    return []


def _load_assumptions(raw: Any, stages: list[Stage], source: str, text: str) -> list[Assumption]:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: [assumptions] must be a table of metric = \"op value\"")
    names = {stage.name: stage for stage in stages}
    result = []
    for key, value in raw.items():
        line = _line_of(text, key)
        hypothesis = value.get("hypothesis") if isinstance(value, dict) else value
        note = str(value.get("source", "")) if isinstance(value, dict) else ""
        if isinstance(value, dict):
            extra = set(value) - {"hypothesis", "source"}
            if extra or hypothesis is None:
                raise UserError(f"{source}{line}: assumption {key!r} takes hypothesis = \"op value\" and an optional source")
        try:
            condition = parse_condition(hypothesis)
        except ExpressionError as error:
            raise UserError(f"{source}{line}: assumption {key!r}: {error}") from None
        stage_name, dot, metric = key.partition(".")
        if dot and stage_name in names:
            if metric not in names[stage_name].metrics:
                raise UserError(
                    f"{source}{line}: assumption {key!r}: stage {stage_name!r} does not produce {metric!r}; "
                    f"it produces: {', '.join(sorted(names[stage_name].metrics))}")
            result.append(Assumption(key, metric, stage_name, condition, f"{key} {condition}", note))
            continue
        if key not in PLAN_METRICS and not any(key in stage.metrics for stage in stages):
            everything = sorted(set().union(PLAN_METRICS, *(s.metrics for s in stages)))
            raise UserError(
                f"{source}{line}: assumption {key!r} names a metric no stage of this plan produces; "
                f"known metrics: {', '.join(everything)}")
        result.append(Assumption(key, key, None, condition, f"{key} {condition}", note))
    return result
