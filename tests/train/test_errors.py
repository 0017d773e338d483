"""A user's mistake in `gonogo train` is one line on stderr and exit code 2, before any worker starts."""

from __future__ import annotations

import pytest

from gonogo.cli import main


@pytest.mark.parametrize("argv, expected", [
    (["train", "tiny-dens"], "unknown preset 'tiny-dens'"),
    (["train", "tiny-dense", "train.stepz=5"], "unknown key 'train.stepz'"),
    (["train", "tiny-dense", "--nproc", "3"], "not divisible by micro_batch_size x processes"),
    (["train", "tiny-moe", "--nproc", "3"], "does not divide the number of processes"),
    (["train", "tiny-moe", "--nproc", "2", "train.expert_parallel=16", "train.global_batch_size=32",
      "--nproc", "16"], "more experts-per-rank than experts"),
    (["train", "tiny-moe", "--nproc", "2", "model.moe.n_experts=3", "model.moe.top_k=1"],
     "does not divide model.moe.n_experts=3"),
    (["train", "tiny-dense", "train.expert_parallel=2", "--nproc", "2"], "needs an MoE model"),
    (["train", "tiny-dense", "train.seq_len=512"], "exceeds model.max_seq_len"),
    (["train", "tiny-dense", "data.source=/no/such/corpus.txt"], "no such file"),
])
def test_bad_input_is_one_line_and_exit_2(argv, expected, capsys, tmp_path):
    code = main([*argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert expected in err
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()  # nothing was started
