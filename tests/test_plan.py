"""Plan validation: every problem is one line with file, line and reason, before anything runs."""

import pytest

from gonogo.errors import UserError
from gonogo.plan import load_plan, resolve_plan_path

GOOD_STAGE = '''
[[stage]]
name = "probe"
kind = "command"
argv = ["python", "-c", "pass"]
metrics = ["score"]
gates = ["score >= 1"]
'''


def test_builtin_plans_validate():
    for name in ("laptop", "quick", "ops"):
        plan = load_plan(resolve_plan_path(name))
        assert plan.stages and plan.name == name


def test_good_plan_loads(write_plan):
    plan = load_plan(write_plan("[plan]\nname = 'p'\n" + GOOD_STAGE + "\n[assumptions]\nscore = '>= 2'\n"))
    assert plan.stages[0].gates[0].metric == "score"
    assert plan.assumptions[0].metric == "score"
    assert plan.assumption_source(plan.assumptions[0]) == "probe"


@pytest.mark.parametrize("text, expected", [
    (GOOD_STAGE.replace('kind = "command"', 'kind = "warp-drive"'), "unknown stage kind 'warp-drive'"),
    (GOOD_STAGE.replace('"score >= 1"', '"scroe >= 1"'), "unknown metric 'scroe'"),
    (GOOD_STAGE.replace('"score >= 1"', '"score => 1"'), "is not 'metric op value'"),
    (GOOD_STAGE + GOOD_STAGE, "duplicate stage name 'probe'"),
    (GOOD_STAGE.replace('metrics = ["score"]', 'metrics = ["score"]\ntimeout = 3'), "unknown key 'timeout'"),
    (GOOD_STAGE.replace('argv = ["python", "-c", "pass"]', 'argv = "python"'), "key 'argv' has bad value"),
    (GOOD_STAGE + "\n[assumptions]\nnonsense_metric = '>= 1'\n", "assumption 'nonsense_metric' names a metric no stage"),
    (GOOD_STAGE + "\n[assumptions]\nscore = 'lots'\n", "assumption 'score'"),
    ("[plan]\nname = 'p'\n", "at least one [[stage]]"),
    ("[plan]\nbudget_device_hours = -1\n" + GOOD_STAGE, "budget_device_hours"),
    ("[plans]\nname = 'p'\n" + GOOD_STAGE, "unknown table 'plans'"),
    ("this is = not toml [", "not valid TOML"),
])
def test_validation_errors_are_one_clear_line(write_plan, text, expected):
    path = write_plan(text)
    with pytest.raises(UserError) as error:
        load_plan(path)
    message = str(error.value)
    assert expected in message
    assert "\n" not in message
    assert str(path) in message


def test_error_names_the_line(write_plan):
    path = write_plan("[plan]\nname = 'p'\n" + GOOD_STAGE.replace('"score >= 1"', '"scroe >= 1"'))
    with pytest.raises(UserError) as error:
        load_plan(path)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "scroe" in text)
    assert f"{path}:{line}" in str(error.value)


def test_unknown_builtin_plan_lists_the_known_ones():
    with pytest.raises(UserError, match="built-in plans: .*laptop"):
        resolve_plan_path("no-such-plan")


def test_model_reference_must_name_an_earlier_stage(write_plan):
    text = GOOD_STAGE.replace('argv = ["python", "-c", "pass"]', 'argv = ["python", "-c", "pass", "@later"]')
    with pytest.raises(UserError, match="'@later' refers to no earlier stage"):
        load_plan(write_plan(text))
    fine = GOOD_STAGE + GOOD_STAGE.replace('name = "probe"', 'name = "second"').replace(
        'argv = ["python", "-c", "pass"]', 'argv = ["python", "-c", "pass", "@probe"]')
    assert len(load_plan(write_plan(fine)).stages) == 2


def _plan_named(tmp_path, name):
    plan = tmp_path / "p.toml"
    plan.write_text(f'[plan]\nname = "{name}"\n[[stage]]\nname = "d"\nkind = "command"\nargv = ["true"]\n')
    return plan


@pytest.mark.parametrize("name", ["/abs", "a/b", "a\\\\b", ".hidden", "..", "x\\ny"])
def test_a_plan_name_that_would_leave_runs_is_refused(tmp_path, name):
    with pytest.raises(UserError, match="plan name .* so the run stays under runs/"):
        load_plan(_plan_named(tmp_path, name))


def test_a_plan_name_that_would_leave_runs_is_one_line_exit_2(tmp_path):
    from tests.conftest import run_gonogo

    result = run_gonogo("run", _plan_named(tmp_path, "../x"), cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "plan name '../x'" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["p.toml"]  # nothing created, here or above


def test_run_dir_refuses_a_plan_name_with_a_separator(tmp_path):
    from gonogo.rundir import RunDir

    with pytest.raises(UserError, match="stays under runs/"):
        RunDir.create(None, "../escape", base=tmp_path / "runs")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "runs").exists()


def test_run_dirs_created_at_once_in_the_same_second_are_never_shared(tmp_path, monkeypatch):
    """Nodes that start `gonogo doctor` together on one shared folder each get their own run
    directory: the name is claimed with one mkdir, not checked and then made."""
    from concurrent.futures import ThreadPoolExecutor

    import gonogo.rundir as rundir

    monkeypatch.setattr(rundir, "utc_stamp", lambda: "20261202T000000Z")  # all in one second
    with ThreadPoolExecutor(8) as pool:
        roots = list(pool.map(lambda _: rundir.RunDir.create(None, "doctor", base=tmp_path / "runs").root,
                              range(16)))
    assert len(set(roots)) == 16
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(r.name for r in roots)
    assert all((root / "stages").is_dir() for root in roots)


def test_the_gpu_smoke_plan_validates_and_declares_its_gpu():
    plan = load_plan(resolve_plan_path("gpu-smoke"))
    assert plan.name == "gpu-smoke" and plan.header.requires_gpus == 1
    kinds = [stage.kind.name for stage in plan.stages]
    assert kinds == ["doctor", "collectives", "train", "drill", "finetune", "eval", "quantize", "serve",
                     "loadtest", "canary"]
    assert plan.stage("quantize").settings.format == "fp8"
    assert all(stage.gates for stage in plan.stages)  # every stage can say NO-GO


def test_gpu_smoke_on_a_cpu_machine_stops_in_one_line_before_creating_anything(tmp_path):
    from tests.conftest import run_gonogo

    out = tmp_path / "run"
    result = run_gonogo("run", "gpu-smoke", "--out", out)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs 1 CUDA GPU(s)" in lines[0] and "sees 0 here" in lines[0], lines
    assert "Traceback" not in result.stderr and not out.exists()


def test_a_gpu_plan_passes_the_check_where_torch_sees_the_gpu(monkeypatch):
    import torch

    from gonogo.runner import check_gpus

    plan = load_plan(resolve_plan_path("gpu-smoke"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_gpus(plan)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(UserError, match="needs 1 CUDA GPU"):
        check_gpus(plan)


def test_plan_parameters_are_substituted_and_checked(tmp_path, write_plan):
    from gonogo.plan import parse_parameters

    model = tmp_path / "model"
    model.mkdir()
    plan = load_plan(resolve_plan_path("byo-model"), {"model": str(model), "data": "chats.jsonl"})
    finetune, canary = plan.stage("finetune"), plan.stage("canary")
    assert finetune.settings.checkpoint == str(model.resolve()) and canary.settings.stable == str(model.resolve())
    assert "data.source=chats.jsonl" in finetune.settings.overrides  # no such file: left as given
    with pytest.raises(UserError, match="needs parameter 'model' \\(a Hugging Face model directory.*model=\\.\\.\\."):
        load_plan(resolve_plan_path("byo-model"), {"data": "x"})
    with pytest.raises(UserError, match="no parameter 'modle'; its parameters are data, model"):
        load_plan(resolve_plan_path("byo-model"), {"modle": "x", "model": "y", "data": "z"})
    undeclared = GOOD_STAGE.replace('argv = ["python", "-c", "pass"]', 'argv = ["python", "${oops}"]')
    with pytest.raises(UserError, match="\\$\\{oops\\} is used but \\[plan\\] parameters does not declare 'oops'"):
        load_plan(write_plan("[plan]\nname = 'p'\n" + undeclared))
    assert parse_parameters(["model=a=b", "data="]) == {"model": "a=b", "data": ""}
    for bad in (["model"], ["1x=2"], ["a=1", "a=2"]):
        with pytest.raises(UserError):
            parse_parameters(bad)


def test_run_names_a_missing_parameter_in_one_line(tmp_path):
    from tests.conftest import run_gonogo

    # parameters may come after the options too
    result = run_gonogo("run", "byo-model", "--out", tmp_path / "run", "data=x.jsonl", cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "needs parameter 'model'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
