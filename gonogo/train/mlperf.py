"""The MLPerf Training log of a pretraining run (``<run>/mlperf.log``), written by rank 0.

Lines are written with the ``mlperf_logging.mllog`` package, as an open-division
``llama31_8b``-style result of ruleset 6.1.0, so that

    python -m mlperf_logging.compliance_checker --usage training --ruleset 6.1.0 mlperf.log

accepts it. Time to train is ``run_stop - run_start``: from the first training step until the
validation loss (``eval_accuracy``, nats per token, lower is better) first reaches
``train.target_val_loss``. A run that never reaches it ends with ``status=aborted``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

BENCHMARK = "llama31_8b"
ORGANIZATION = "gonogo"


class MlperfLog:
    def __init__(self, path: Path, *, platform: str, config_filename: str, precision: str,
                 expert_parallelism: int, micro_batch_size: int, global_batch_size: int,
                 seq_len: int, train_samples: int, eval_samples: int, target: float,
                 params: Optional[dict[str, Any]] = None):
        from mlperf_logging.mllog import constants
        from mlperf_logging.mllog.mllog import MLLogger

        self.constants = constants
        self.target = target
        self.run_started_ms: Optional[int] = None
        self.stopped = False
        self.time_to_target_s: Optional[float] = None
        # a logger of our own (not mllog's shared default), writing only to this file
        logger = logging.getLogger(f"gonogo.mlperf.{id(self)}")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        self._handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        logger.addHandler(self._handler)
        self._logger = logger
        self.mllogger = MLLogger(logger=logger, default_stack_offset=2)

        c = constants
        self.mllogger.event(key=c.CACHE_CLEAR, value=True)
        self.mllogger.start(key=c.INIT_START)
        self.mllogger.event(key=c.SUBMISSION_ORG, value=ORGANIZATION)
        self.mllogger.event(key=c.SUBMISSION_PLATFORM, value=platform)
        self.mllogger.event(key=c.SUBMISSION_DIVISION, value="open")
        self.mllogger.event(key=c.SUBMISSION_STATUS, value="research")
        self.mllogger.event(key=c.SUBMISSION_BENCHMARK, value=BENCHMARK)
        precision_name = "bfloat16" if precision == "bf16" else "fp32"
        self.mllogger.event(key=c.LOWEST_NUMERICAL_PRECISION_IN_LINEAR, value=precision_name)
        self.mllogger.event(key=c.LOWEST_NUMERICAL_PRECISION_IN_ATTN, value=precision_name)
        # gradients are reduced in fp32 in every mode (FSDP2 reduce_dtype, DDP fp32 grads)
        self.mllogger.event(key=c.LOWEST_NUMERICAL_PRECISION_IN_COMM, value="fp32")
        self.mllogger.event(key=c.TENSOR_PARALLELISM, value=1)
        self.mllogger.event(key=c.PIPELINE_PARALLELISM, value=1)
        self.mllogger.event(key=c.CONTEXT_PARALLELISM, value=1)
        self.mllogger.event(key=c.EXPERT_PARALLELISM, value=expert_parallelism)
        self.mllogger.event(key=c.MICRO_BATCH_SIZE, value=micro_batch_size)
        self.mllogger.event(key=c.GLOBAL_BATCH_SIZE, value=global_batch_size)
        self.mllogger.event(key=c.MAX_SEQUENCE_LENGTH, value=seq_len)
        self.mllogger.event(key=c.CONFIG_FILENAME, value=config_filename)
        self.mllogger.event(key=c.TRAIN_SAMPLES, value=train_samples)
        self.mllogger.event(key=c.EVAL_SAMPLES, value=eval_samples)
        self.mllogger.event(key="target_accuracy", value=target)
        for key, value in (params or {}).items():
            self.mllogger.event(key=key, value=value)

    def run_start(self) -> None:
        c = self.constants
        self.mllogger.end(key=c.INIT_STOP)
        now = int(time.time() * 1000)
        self.mllogger.start(key=c.RUN_START, time_ms=now)
        self.run_started_ms = now

    def block_start(self, samples_count: int) -> None:
        if not self.stopped:
            self.mllogger.start(key=self.constants.BLOCK_START, metadata={"samples_count": samples_count})

    def block_stop(self, samples_count: int) -> None:
        if not self.stopped:
            self.mllogger.end(key=self.constants.BLOCK_STOP, metadata={"samples_count": samples_count})

    def eval(self, samples_count: int, val_loss: float, started_ms: int) -> bool:
        """Log one evaluation; returns True when it reached the target (and the run stops)."""
        if self.stopped:
            return False
        c = self.constants
        self.mllogger.start(key=c.EVAL_START, time_ms=started_ms, metadata={"samples_count": samples_count})
        self.mllogger.event(key=c.EVAL_ACCURACY, value=float(val_loss), metadata={"samples_count": samples_count})
        self.mllogger.end(key=c.EVAL_STOP, metadata={"samples_count": samples_count})
        if val_loss <= self.target:
            self.stop("success", samples_count)
            return True
        return False

    def stop(self, status: str, samples_count: int) -> None:
        """``run_stop`` (once): ``success`` at the target, ``aborted`` at the end otherwise."""
        if self.stopped:
            return
        assert self.run_started_ms is not None, "run_stop before run_start"
        now = int(time.time() * 1000)
        self.mllogger.end(key=self.constants.RUN_STOP, time_ms=now,
                          metadata={"status": status, "samples_count": samples_count})
        self.stopped = True
        if status == "success":
            self.time_to_target_s = (now - self.run_started_ms) / 1000.0

    def close(self) -> None:
        self._logger.removeHandler(self._handler)
        self._handler.close()
