"""``gonogo capacity`` through the real CLI: one capacity stage through the plan runner (run
directory, the default gate ``fits == true``), the table, --json, and one-line errors with exit 2."""

import json
import tomllib

import pytest

from tests.conftest import run_gonogo


def test_table_json_and_the_run_directory(tmp_path):
    out = tmp_path / "estimate.json"
    run = tmp_path / "run"
    result = run_gonogo("capacity", "--model", "llama3-405b", "--gpu", "h100", "--gpus", "16384", "--tp", "8",
                        "--pp", "16", "--global-batch", "2048", "--tokens", "15.6T", "--sharding", "zero1",
                        "--activation-checkpointing", "full", "--json", out, "--out", run, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fits" in result.stdout and "time to train" in result.stdout
    assert "GO" in result.stderr  # the runner's verdict, beside the table
    estimate = json.loads(out.read_text())
    assert estimate["fits"] is True and estimate["tokens"] == 15.6e12
    assert set(estimate["memory_GB"]) >= {"parameters", "gradients", "optimizer_states", "activations", "total"}
    assert set(estimate["step_time_s"]) >= {"compute", "tensor_parallel", "data_parallel", "pipeline_bubble", "total"}

    # the run directory of a one-stage plan: the plan as run, its state, the stage's files, the report
    plan = tomllib.loads((run / "plan.toml").read_text())
    assert plan["stage"][0]["kind"] == "capacity" and plan["stage"][0]["gates"] == ["fits == true"]
    assert plan["stage"][0]["tp"] == 8 and plan["stage"][0]["tokens"] == 15.6e12
    assert json.loads((run / "state.json").read_text())["stages"]["capacity"]["status"] == "passed"
    metrics = json.loads((run / "stages" / "capacity" / "metrics.json").read_text())
    assert metrics["fits"] is True and metrics["gpu_hours"] == pytest.approx(estimate["gpu_hours"])
    document = json.loads((run / "stages" / "capacity" / "capacity.json").read_text())
    assert document["estimate"] == estimate
    assert json.loads((run / "summary.json").read_text())["verdict"] == "GO"
    assert "Estimate:" in (run / "report.html").read_text()


def test_json_to_stdout_says_it_does_not_fit_and_the_verdict_is_no_go(tmp_path):
    result = run_gonogo("capacity", "--model", "llama3-405b", "--gpu", "h100", "--gpus", "8", "--sharding", "none",
                        "--json", "-", cwd=tmp_path, timeout=120)
    assert result.returncode == 1, result.stderr  # the default gate fits == true
    assert json.loads(result.stdout)["fits"] is False  # stdout holds the JSON alone
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("capacity-")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["verdict"] == "NO-GO" and "fits == true" in summary["reasons"][0]


@pytest.mark.parametrize("flags, message", [
    (["--gpu", "h100", "--gpus", "16", "--tp", "3"], "does not divide the model's n_heads"),
    (["--gpu", "h100", "--gpus", "100", "--tp", "8"], "does not divide --gpus 100"),
    (["--gpu", "a100", "--gpus", "8"], "unknown GPU kind"),
    (["--gpu", "h100", "--gpus", "8", "--mfu", "1.5"], "'mfu'"),
    (["--gpu", "this-machine", "--gpus", "8"], "works inside a plan"),
])
def test_impossible_inputs_exit_2_with_one_line_and_create_nothing(flags, message, tmp_path):
    result = run_gonogo("capacity", "--model", "llama3-8b", *flags, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []  # no run directory, no runs/


def test_a_model_file_with_an_impossible_layout_is_refused_before_the_run_directory(tmp_path):
    (tmp_path / "model.toml").write_text("[model]\nd_model = 64\nn_layers = 2\nn_heads = 4\nn_kv_heads = 2\n"
                                         "ffn_dim = 128\nmax_seq_len = 128\n")
    result = run_gonogo("capacity", "--model", "model.toml", "--gpu", "h100", "--gpus", "8", "--tp", "3",
                        cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "does not divide the model's n_heads" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.toml"]
    good = run_gonogo("capacity", "--model", "model.toml", "--gpu", "h100", "--gpus", "2", "--json", "-",
                      cwd=tmp_path, timeout=120)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["gpus"] == 2
