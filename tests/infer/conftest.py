"""Shared fixtures: a tiny random-weight checkpoint on disk and a real server process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from gonogo.model.config import ModelConfig, MoEConfig

API_KEY = "test-key-123"
KEY_ENV = "GONOGO_TEST_API_KEY"
REPO_ROOT = Path(__file__).resolve().parents[2]


def tiny_config(moe: bool = False) -> ModelConfig:
    return ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256,
                       moe=MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=64) if moe else None)


def tiny_model(moe: bool = False, seed: int = 1):
    """A random model whose greedy output varies from token to token.

    With the training init (std 0.02) an untrained model repeats one token forever, which would
    make "same text alone and batched" pass trivially; larger weights give peaked, varied logits.
    """
    from gonogo.model.decoder import Decoder

    model = Decoder(tiny_config(moe))
    model.init_weights(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.mul_(8.0)
    return model.eval()


def write_checkpoint(directory: Path, model, step: int = 10) -> Path:
    """A committed checkpoint the way the checkpoint helper writes one (weights + meta + manifest)."""
    from safetensors.torch import save_file

    from gonogo.checkpoints import manifest

    directory.mkdir(parents=True)
    weights = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, str(directory / "model.safetensors"))
    meta = {"step": step, "model": model.config.model_dump(), "tokenizer": "byte-v1", "world_size": 1, "train": {}}
    (directory / "meta.json").write_text(json.dumps(meta))
    manifest.commit(directory)
    return directory


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "step-00000010", tiny_model())


class ServerProcess:
    def __init__(self, process: subprocess.Popen, url: str, log_path: Path):
        self.process = process
        self.url = url
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


def start_server(checkpoint: Path, workdir: Path, *extra: str, api_key: str | None = API_KEY,
                 timeout: float = 60.0, verbose: bool = False) -> ServerProcess:
    """`gonogo serve` on a free loopback port; returns once /health answers (bounded)."""
    ready = workdir / "ready.json"
    log_path = workdir / "server.log"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = [sys.executable, "-m", "gonogo", *(["-v"] if verbose else []), "serve", "--checkpoint", str(checkpoint), "--port", "0",
            "--ready-file", str(ready), *extra]
    if api_key is not None:
        env[KEY_ENV] = api_key
        argv += ["--api-key-env", KEY_ENV]
    with log_path.open("w") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    deadline = time.monotonic() + timeout
    server = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
        if ready.exists():
            url = json.loads(ready.read_text())["url"]
            server = ServerProcess(process, url, log_path)
            try:
                if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    (server or ServerProcess(process, "", log_path)).stop()
    raise RuntimeError(f"server did not become healthy within {timeout} s:\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def server(checkpoint_dir, tmp_path_factory):
    process = start_server(checkpoint_dir, tmp_path_factory.mktemp("server"))
    yield process
    process.stop()
