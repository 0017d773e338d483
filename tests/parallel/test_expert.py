"""Expert parallelism over 2 real gloo processes (torchrun) equals the unsharded layer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gonogo.cluster.torchrun import free_port, torchrun_env

WORKER = Path(__file__).with_name("ep_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
               "--max-restarts=0", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
               str(WORKER), str(out)]
    done = subprocess.run(command, env=torchrun_env({"OMP_NUM_THREADS": "1"}), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("scenario", ["softmax-shared", "sigmoid-capacity", "all-to-rank-0"])
def test_ep2_forward_and_gradients_equal_ep1(results, scenario):
    for rank, result in enumerate(results):
        diffs = result[scenario]
        assert diffs["logits"] < 1e-5, (rank, diffs)
        assert diffs["aux"] < 1e-6, (rank, diffs)
        assert diffs["counts_equal"], (rank, diffs)
        assert diffs["grad_dense"] < 1e-5, (rank, diffs)
        assert diffs["grad_expert"] < 1e-5 * max(1.0, diffs["expert_grad_scale"]), (rank, diffs)
        assert diffs["expert_grad_scale"] > 0  # the comparison is not between zeros
        assert diffs["init_slice_equal"], (rank, diffs)
        assert diffs["gathered_equal"] and diffs["reloaded_equal"], (rank, diffs)


def test_a_group_of_one_keeps_experts_local(results):
    assert all(result["ep1_local"] for result in results)


def test_indivisible_expert_count_is_a_clear_error(results):
    message = results[0]["indivisible_error"]
    assert message is not None and "n_experts=3" in message and "2 ranks" in message


def test_sharded_experts_replace_the_module_and_keep_the_math(results):
    for rank, result in enumerate(results):
        assert result["sharded"] == {"types": True, "old_modules_untouched": True, "names_equal": True,
                                     "returned_are_the_dtensors": True, "logits_equal": True, "grads_equal": True,
                                     "full_tensor_equal": True}, (rank, result["sharded"])
