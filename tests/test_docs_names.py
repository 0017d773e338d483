"""The docs name only events, metrics, config keys and report blocks that exist in the code.

The convention (docs/adding-a-stage.md, "Names in the docs"), on every page of docs/:

- **events**: a backticked name next to the word event(s) ("a `hang_detected` event",
  "events `loss_guard`, `rollback`"), or in the parentheses after `events.jsonl`, is an event kind
  that gonogo writes (a literal ``"event": "..."`` or ``event="..."`` in gonogo/);
- **metrics**: the backticked names in the first column of a table headed ``metric``, and the
  snake_case names in a column headed ``symptom`` or ``what you see``, are metrics some stage
  kind declares (or the runner adds); the left side of a backticked comparison
  (`ecc_errors > 0`) is such a metric or a setting (`ep > 1`);
- **config keys**: a backticked ``train.<key>`` or ``data.<key>`` (``= value`` may follow) is a field of ``[train]`` /
  ``[data]``; the backticked names in a table column headed ``key`` or ``settings (`train.*`)``
  are fields of the training config (``*`` matches a family, e.g. `watchdog_*`);
- **metric lists**: the backticked names of a paragraph that starts "Metrics:" or "Stage
  metrics (...):", and the left side of every gate in a ``gates = [...]`` example, are metrics;
- **report blocks**: a double-quoted title after "report block(s)" is the title of a block some
  stage kind's report produces.

A rename in the code without the docs (or a docs page naming something that never existed) fails
here with the page, the line and the name.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
NAME = r"[A-Za-z_][\w@.*]*"
TICKED = rf"`{NAME}`"
TICKED_LIST = rf"{TICKED}(?:\s*(?:,|and|or)\s*{TICKED})*"


def _python_files():
    return sorted((ROOT / "gonogo").rglob("*.py"))


def _string(node) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def code_events() -> set[str]:
    events = set()
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values):
                    if key is not None and _string(key) == "event" and _string(value):
                        events.add(_string(value))
            elif isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg == "event" and _string(keyword.value):
                        events.add(_string(keyword.value))
    return events


def report_titles() -> set[str]:
    titles = set()
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ReportItem":
                candidates = node.args[:1] + [k.value for k in node.keywords if k.arg == "title"]
                for candidate in candidates:
                    if _string(candidate):
                        titles.add(_string(candidate))
                    elif isinstance(candidate, ast.JoinedStr):  # an f-string: its fixed start
                        titles.add("".join(_string(part) or "*" for part in candidate.values))
    return titles


def prometheus_series() -> set[str]:
    """The names the server registers with prometheus-client (string literals gonogo_*)."""
    text = (ROOT / "gonogo" / "infer" / "server.py").read_text(encoding="utf-8")
    return set(re.findall(r'"(gonogo_\w+)"', text)) | {f"{name}_total" for name in re.findall(r'"(gonogo_\w+)"', text)}


def declared_metrics() -> set[str]:
    """What every stage of the built-in plans declares, and every kind with its default settings."""
    from pydantic import ValidationError

    from gonogo.plan import PLAN_METRICS, PLANS_DIR, STAGE_RUNNER_METRICS, load_plan
    from gonogo.stages import get_kind, kind_names

    names = set(PLAN_METRICS) | set(STAGE_RUNNER_METRICS)
    from gonogo.typed_config import load_toml

    for plan in sorted(PLANS_DIR.glob("*.toml")):
        declared = load_toml(plan).get("plan", {}).get("parameters", {})  # byo-model: any value validates
        for stage in load_plan(plan, {name: "placeholder" for name in declared}).stages:
            names |= stage.metrics
    train = get_kind("train")
    for preset in sorted((ROOT / "gonogo" / "configs").glob("*.toml")):  # MoE presets add MoE metrics
        names |= set(train.metrics(train.settings.model_validate({"config": preset.stem})))
    for kind_name in kind_names():
        kind = get_kind(kind_name)
        try:
            names |= set(kind.metrics(kind.settings.model_validate({})))
        except ValidationError:  # a kind with required settings: the plans' stages cover it
            pass
    doctor = get_kind("doctor")  # the cluster figures exist with nnodes > 1 only
    names |= set(doctor.metrics(doctor.settings.model_validate({"nnodes": 2, "rdzv_endpoint": "node0:29400"})))
    return names


def _fields(model, seen=None) -> set[str]:
    """Field names of a pydantic settings model and of every settings model nested in it."""
    from pydantic import BaseModel

    seen = set() if seen is None else seen
    if model in seen:
        return set()
    seen.add(model)
    names = set(model.model_fields)
    for field in model.model_fields.values():
        for inner in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                names |= _fields(inner, seen)
    return names


def config_fields() -> dict[str, set[str]]:
    from gonogo.capacity.planner import CapacitySettings
    from gonogo.model.shape import ModelConfig
    from gonogo.stages import get_kind, kind_names
    from gonogo.train.config import DataConfig, TrainSettings

    settings: set[str] = _fields(CapacitySettings)
    for kind_name in kind_names():
        settings |= _fields(get_kind(kind_name).settings)
    return {"train": set(TrainSettings.model_fields), "data": set(DataConfig.model_fields),
            "model": _fields(ModelConfig), "stage": settings}


# -- what the pages say -------------------------------------------------------------------------

def _names(text: str) -> list[str]:
    return re.findall(rf"`({NAME})`", text)


def mentions(path: Path) -> list[tuple[int, str, str]]:
    """(line, category, name) for every name the page mentions under the convention."""
    found = []
    lines = path.read_text(encoding="utf-8").splitlines()
    header: list[str] = []
    metric_paragraph = False
    for number, line in enumerate(lines, start=1):
        # a paragraph that starts "Metrics:" or "Stage metrics (...):" lists metrics
        metric_paragraph = bool(line.strip()) and (metric_paragraph or bool(
            re.match(r"(Stage metrics|Metrics)\b[^:]*:", line)))
        if metric_paragraph:
            # the list is the paragraph's first sentence; parentheses explain, they do not list
            listed = re.sub(r"^(Stage metrics|Metrics)\b[^:]*:", "", line)
            listed, ended = re.subn(r"(;|\.(\s|$)).*$", "", re.sub(r"\([^)]*\)", "", listed))
            found += [(number, "metric", name) for name in _names(listed) if "." not in name]
            metric_paragraph = not ended
        for gates in re.findall(r"\bgates\s*=\s*\[(.*)\]", line):
            found += [(number, "condition", name)
                      for name in re.findall(r'"(\w[\w@]*)\s*(?:<=|>=|==|!=|<|>)[^"]*"', gates)]
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if number < len(lines) and re.fullmatch(r"\|[-| :]+\|", lines[number].strip()):
                header = [cell.lower() for cell in cells]
            elif not re.fullmatch(r"[-: ]*", "".join(cells)):
                for column, cell in zip(header, cells):
                    if column == "metric" and cell is cells[0]:
                        # gonogo_* in a metric table: the server's Prometheus series (docs/serving.md)
                        found += [(number, "prometheus" if name.startswith("gonogo_") else "metric", name)
                                  for name in _names(cell)]
                    elif column in ("symptom", "what you see"):
                        # events (and their fields: "with `x`") are checked as events below
                        groups = (re.findall(rf"\bevents?\s+({TICKED_LIST})", cell)
                                  + re.findall(rf"({TICKED_LIST})\s+events?\b", cell)
                                  + re.findall(rf"\bwith\s+({TICKED_LIST})", cell))
                        others = {name for group in groups for name in _names(group)}
                        found += [(number, "metric", name) for name in _names(cell)
                                  if "_" in name and "." not in name and name not in others]
                    elif column == "key" or column.startswith("settings (`train.*`)"):
                        own = re.sub(r"the plan's `\w+`", "", cell)  # a plan key, checked below
                        found += [(number, "train-key", name) for name in _names(own)]
        else:
            header = []
        for group in re.findall(rf"\bevents?\s+({TICKED_LIST})", line):
            found += [(number, "event", name) for name in _names(group)]
        for group in re.findall(rf"({TICKED_LIST})\s+events?\b", line):
            found += [(number, "event", name) for name in _names(group)]
        for group in re.findall(r"`events\.jsonl`\s*\(([^)]*)\)", line):
            found += [(number, "event", name) for name in _names(group)]
        for name in re.findall(r"`((?:train|data)\.\w+)(?:\s*=[^`]*)?`", line):
            found.append((number, "config", name))
        for name in re.findall(r"`(\w[\w@]*)\s*(?:<=|>=|==|!=|<|>)\s*[^`]+`", line):
            found.append((number, "condition", name))
        for name in re.findall(r"\bthe plan's `(\w+)`", line):
            found.append((number, "plan-key", name))
        for group in re.findall(r'report blocks?\s+((?:"[^"]+"(?:\s*(?:,|and|or)\s*)?)+)', line):
            found += [(number, "report", title) for title in re.findall(r'"([^"]+)"', group)]
    return found


@pytest.fixture(scope="module")
def known():
    from gonogo.plan import RUNNER_KEYS, PlanHeader

    return {"event": code_events(), "metric": declared_metrics(), "config": config_fields(),
            "report": report_titles(), "plan": set(PlanHeader.model_fields) | RUNNER_KEYS,
            "prometheus": prometheus_series()}


def _exists(category: str, name: str, known) -> bool:
    if category == "event":
        return name in known["event"]
    if category == "metric":
        pattern = re.sub(r"(@|_)k$", r"\1*", name)  # maj@k, best_of_k: one metric per k
        return any(fnmatch.fnmatchcase(metric, pattern) for metric in known["metric"])
    if category == "condition":  # a gate on a metric, or a condition on a setting
        return _exists("metric", name, known) or any(name in fields for fields in known["config"].values())
    if category == "plan-key":
        return name in known["plan"]
    if category == "prometheus":
        return name in known["prometheus"]
    if category == "config":
        table, _, key = name.partition(".")
        return key in known["config"][table]
    if category == "train-key":
        return any(fnmatch.fnmatchcase(field, name) for field in known["config"]["train"])
    assert category == "report"
    # a block may be cited by the leading words of its title ("Straggler scores")
    return any(fnmatch.fnmatchcase(name, title) or title.startswith(name) for title in known["report"])


def test_the_convention_finds_names_in_the_pages():
    everything = [m for page in DOCS for m in mentions(page)]
    assert {category for _, category, _ in everything} >= {"event", "metric", "config", "train-key", "report",
                                                           "condition", "prometheus"}
    assert len(everything) > 100


@pytest.mark.parametrize("page", DOCS, ids=lambda path: path.name)
def test_every_name_a_page_mentions_exists(page, known):
    missing = [f"{page.name}:{line}: {category} {name!r}" for line, category, name in mentions(page)
               if not _exists(category, name, known)]
    assert not missing, "names the docs mention but the code does not have:\n" + "\n".join(missing)


def test_a_renamed_event_would_be_caught(tmp_path, known):
    page = tmp_path / "page.md"
    page.write_text("A `hang_detected` event and events `loss_guard`, `nan_detected`; "
                    "`events.jsonl` (`rollback`). The report block \"No such plot\".\n"
                    "| metric | meaning |\n|---|---|\n| `ttft_p95_ms`, `ttft_p95_msec` | x |\n"
                    "Set `train.checkpoint_asynch`. Gate `wrong_totals == 0`.\n")
    missing = {(category, name) for _, category, name in mentions(page) if not _exists(category, name, known)}
    assert missing == {("event", "nan_detected"), ("event", "rollback"), ("report", "No such plot"),
                       ("metric", "ttft_p95_msec"), ("config", "train.checkpoint_asynch"),
                       ("condition", "wrong_totals")}
