"""``gonogo capacity`` through the real CLI: the table, --json, and one-line errors with exit 2."""

import json

import pytest

from tests.conftest import run_gonogo


def test_table_and_json(tmp_path):
    out = tmp_path / "estimate.json"
    result = run_gonogo("capacity", "--model", "llama3-405b", "--gpu", "h100", "--gpus", "16384", "--tp", "8",
                        "--pp", "16", "--global-batch", "2048", "--tokens", "15.6T", "--sharding", "zero1",
                        "--activation-checkpointing", "full", "--json", out, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fits" in result.stdout and "time to train" in result.stdout
    estimate = json.loads(out.read_text())
    assert estimate["fits"] is True and estimate["tokens"] == 15.6e12
    assert set(estimate["memory_GB"]) >= {"parameters", "gradients", "optimizer_states", "activations", "total"}
    assert set(estimate["step_time_s"]) >= {"compute", "tensor_parallel", "data_parallel", "pipeline_bubble", "total"}


def test_json_to_stdout_says_it_does_not_fit():
    result = run_gonogo("capacity", "--model", "llama3-405b", "--gpu", "h100", "--gpus", "8", "--sharding", "none",
                        "--json", "-", timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["fits"] is False


@pytest.mark.parametrize("flags, message", [
    (["--gpu", "h100", "--gpus", "16", "--tp", "3"], "does not divide the model's n_heads"),
    (["--gpu", "h100", "--gpus", "100", "--tp", "8"], "does not divide --gpus 100"),
    (["--gpu", "a100", "--gpus", "8"], "unknown GPU kind"),
    (["--gpu", "h100", "--gpus", "8", "--mfu", "1.5"], "'mfu'"),
])
def test_impossible_inputs_exit_2_with_one_line(flags, message):
    result = run_gonogo("capacity", "--model", "llama3-8b", *flags, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
