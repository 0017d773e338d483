"""Fixtures of the eval tests: tiny random-weight checkpoints (see eval_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.eval.eval_helpers import write_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """(a "pretrained" text checkpoint, a "finetuned" chat checkpoint) with different weights."""
    root = tmp_path_factory.mktemp("eval-checkpoints")
    return write_checkpoint(root / "pretrained", seed=1), write_checkpoint(root / "finetuned", seed=2, chat=True)
