import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_gonogo(*args, cwd=None, timeout=600, env=None):
    """Run the real CLI (python -m gonogo) in a subprocess; returns CompletedProcess."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")])
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-m", "gonogo", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def write_plan(tmp_path):
    def write(text: str, name: str = "plan.toml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path
    return write


@pytest.fixture(scope="session")
def tiny_hf_models(tmp_path_factory):
    """{architecture: directory} of tiny random Hugging Face models (tests/hf_models.py), made once."""
    from tests.hf_models import make_models

    return make_models(tmp_path_factory.mktemp("hf-models"))
