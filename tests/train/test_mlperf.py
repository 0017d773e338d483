"""The MLPerf log a run writes passes the official compliance checker (ruleset 6.1.0, open llama31_8b)."""

from __future__ import annotations

import time
from pathlib import Path

from gonogo.train.mlperf import MlperfLog
from tests.train.train_helpers import check_mlperf


def write_log(path: Path, val_losses: list[float], target: float) -> MlperfLog:
    log = MlperfLog(path, platform="2x test CPU", config_filename="tiny-dense.toml", precision="bf16",
                    expert_parallelism=1, micro_batch_size=2, global_batch_size=8, seq_len=64,
                    train_samples=8 * 10 * len(val_losses), eval_samples=16, target=target)
    log.run_start()
    log.block_start(samples_count=0)
    for index, val_loss in enumerate(val_losses, start=1):
        samples = index * 80
        log.block_stop(samples)
        if log.eval(samples, val_loss, int(time.time() * 1000)):
            break
        log.block_start(samples)
    log.stop("aborted", len(val_losses) * 80)
    log.close()
    return log


def test_log_that_reaches_the_target_passes_the_checker(tmp_path):
    path = tmp_path / "mlperf.log"
    log = write_log(path, [3.2, 1.4, 0.9, 0.7], target=0.95)
    assert log.time_to_target_s is not None and log.time_to_target_s >= 0
    text = path.read_text()
    assert text.count("run_stop") == 1 and '"status": "success"' in text
    assert "0.7" not in text.split("run_stop")[1]  # nothing is logged after run_stop
    outcome = check_mlperf(path)
    assert "SUCCESS" in outcome.stdout + outcome.stderr, outcome.stdout + outcome.stderr


def test_log_that_never_reaches_a_loss_below_one_fails_the_checker(tmp_path):
    path = tmp_path / "mlperf.log"
    log = write_log(path, [3.2, 2.5], target=1.0)
    assert log.time_to_target_s is None
    assert '"status": "aborted"' in path.read_text()
    outcome = check_mlperf(path)
    assert "FAILED" in outcome.stdout + outcome.stderr
