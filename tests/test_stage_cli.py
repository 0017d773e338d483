"""`gonogo <kind>`: every stage kind's command comes from the one registry and runs its stage
through the plan runner (a one-stage plan in memory): run directory, gates, report, exit codes."""

from __future__ import annotations

import json
import tomllib
from typing import Any

import pytest
from pydantic import Field

from gonogo import stages
from gonogo.cli import COMMANDS, all_commands, main
from gonogo.errors import StageFailed, UserError
from gonogo.stages.base import StageContext, StageKind, StageSettings


class CountSettings(StageSettings):
    count: int = Field(default=2, ge=0)
    sizes: list[int] = Field(default_factory=lambda: [1, 2])
    label: str = "plain"
    loud: bool = False
    fail_with: str = ""      # "stage", "user", "interrupt": how the run ends instead of measuring


def run(context: StageContext, settings: CountSettings) -> dict[str, Any]:
    if settings.fail_with == "stage":
        raise StageFailed("the stage failed on purpose")
    if settings.fail_with == "user":
        raise UserError("a mistake the user made")
    if settings.fail_with == "interrupt":
        raise KeyboardInterrupt
    (context.stage_dir / "seen.json").write_text(json.dumps(settings.model_dump()))
    return {"count": settings.count, "total": sum(settings.sizes)}


STAGE = StageKind(name="count", description="counts (a test kind)", settings=CountSettings,
                  metrics=lambda settings: {"count", "total"}, run=run,
                  default_gates=lambda settings: ["count >= 1"])


def test_every_stage_command_but_serve_runs_its_stage_through_the_plan_runner():
    """`gonogo <kind>` builds the kind's settings and runs them with runner.run_stage_alone. Only
    `gonogo serve` keeps a command of its own: it holds a server in the foreground until Ctrl-C,
    which is not one gated stage (the plans' serve stage runs through the runner)."""
    own = [kind for kind in stages.KINDS
           if (command := stages.get_kind(kind).command) is not None
           and getattr(command.instead, "__qualname__", "").startswith("own_command")]
    assert own == ["serve"]


@pytest.fixture
def count_kind(monkeypatch):
    monkeypatch.setitem(stages.KINDS, "count", (__name__, "counts (a test kind)"))
    monkeypatch.delitem(stages._loaded, "count", raising=False)
    yield
    stages._loaded.pop("count", None)


def test_every_stage_kind_with_a_command_is_one_and_the_rest_are_not_stages():
    commands = all_commands()
    for kind, (module, help_text) in stages.KINDS.items():
        assert stages.get_kind(kind).name == kind, module
        assert (kind in commands) == (help_text is not None), kind
    assert set(COMMANDS) == {"run", "launch", "report", "engine", "tokenizer", "export"}
    # serve and capacity are the modules the plans run (they used to differ between two lists)
    assert stages.KINDS["serve"][0] == "gonogo.stages.serve.stage"
    assert stages.KINDS["capacity"][0] == "gonogo.stages.capacity.stage"
    assert stages.KINDS["drill"][0] == "gonogo.stages.drill.stage"  # a kind in its own folder


def test_flags_are_derived_from_the_settings_and_the_stage_runs_through_the_runner(count_kind, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["count", "--count", "3", "--sizes", "4,5", "--label", "x", "--loud", "--out", str(out)]) == 0
    seen = json.loads((out / "stages" / "count" / "seen.json").read_text())
    assert seen == {"count": 3, "sizes": [4, 5], "label": "x", "loud": True, "fail_with": ""}
    # the runner's run directory: the plan as run (written from the plan in memory), state, verdict, report
    plan = tomllib.loads((out / "plan.toml").read_text())
    assert plan["plan"]["name"] == "count"
    assert plan["stage"] == [{"name": "count", "kind": "count", "count": 3, "sizes": [4, 5], "label": "x",
                              "loud": True, "fail_with": "", "gates": ["count >= 1"], "continue_on_fail": False}]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "GO" and [g["expression"] for g in summary["gates"]] == ["count >= 1"]
    assert json.loads((out / "state.json").read_text())["stages"]["count"]["status"] == "passed"
    assert (out / "report.html").is_file()
    metrics = json.loads((out / "stages" / "count" / "metrics.json").read_text())
    assert metrics["total"] == 9 and "stage_wall_seconds" in metrics
    assert "GO" in capsys.readouterr().err


def test_the_kinds_default_gates_decide_the_exit_code(count_kind, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["count", "--count", "0", "--out", str(out)]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "NO-GO" and "count >= 1" in summary["reasons"][0]
    assert main(["count", "--fail-with", "stage", "--out", str(tmp_path / "failed")]) == 1
    assert json.loads((tmp_path / "failed" / "summary.json").read_text())["verdict"] == "NO-GO"


def test_mistakes_are_one_line_exit_2_and_an_interrupt_is_130(count_kind, tmp_path, capsys):
    assert main(["count", "--count", "-1", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gonogo count: error:") and "count" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()  # validated before the run directory exists
    assert main(["count", "--fail-with", "user", "--out", str(tmp_path / "user")]) == 2
    assert capsys.readouterr().err.strip().endswith("gonogo count: error: a mistake the user made")
    assert main(["count", "--fail-with", "interrupt", "--out", str(tmp_path / "stopped")]) == 130
    record = json.loads((tmp_path / "stopped" / "state.json").read_text())["stages"]["count"]
    assert record["status"] == "interrupted" and f"--out {tmp_path / 'stopped'}" in record["reason"]


def test_a_run_of_one_stage_resumes_like_a_plan(count_kind, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["count", "--fail-with", "interrupt", "--out", str(out)]) == 130
    # the plan.toml the runner wrote is a plan like any other: `gonogo run --resume` continues it
    plan = out / "plan.toml"
    plan.write_text(plan.read_text().replace('fail_with = "interrupt"', 'fail_with = ""'))
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--resume", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["verdict"] == "GO"


def test_help_of_a_stage_command_lists_its_derived_flags(count_kind, capsys):
    with pytest.raises(SystemExit):
        main(["count", "--help"])
    text = capsys.readouterr().out
    for flag in ("--count", "--sizes", "--label", "--loud", "--out"):
        assert flag in text, flag


def test_an_interrupted_stage_claims_no_metrics(count_kind, tmp_path, capsys):
    out = tmp_path / "stopped"
    assert main(["count", "--fail-with", "interrupt", "--out", str(out)]) == 130
    assert not (out / "stages" / "count" / "metrics.json").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1] == "gonogo count: interrupted"
