"""What the tests of bench/ scripts share: a script loaded as a module, and a watch that says quiet."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from bench.quiet import LoadWatch


def load_bench(name: str) -> ModuleType:
    """bench/<name>.py as a module (bench/ scripts are run by path, not imported as a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quiet_watch() -> LoadWatch:
    """A LoadWatch that saw a quiet 2-core machine: verdicts are given."""
    watch = LoadWatch(cores=2)
    watch.load_before = watch.load_after = (0.1, 0.1, 0.1)
    watch.other_share = watch.other_share_before = 0.0
    return watch
