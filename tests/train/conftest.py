"""Fixtures of the trainer tests (plain helpers are in train_helpers.py)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def alphabet_corpus(tmp_path_factory) -> Path:
    """A text corpus a tiny model learns below 1 nat/token in a few dozen steps: runs of the alphabet."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz" * 6
    paragraphs = []
    for _ in range(400):
        start, length = rng.randrange(26), rng.randrange(30, 120)
        paragraphs.append(letters[start:start + length])
    path = tmp_path_factory.mktemp("corpus") / "alphabet.txt"
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def private_peak_cache(tmp_path_factory, monkeypatch):
    """Keep the tests' GEMM probe (taken on a busy machine) out of the user's real cache."""
    cache = tmp_path_factory.getbasetemp() / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
