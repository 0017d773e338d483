"""Shared fixtures: a tiny random-weight checkpoint on disk and a real server process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from gonogo.infer.engines.process import ServerProcess
from gonogo.infer.engines.start import GonogoServeOptions, start_gonogo_server
from gonogo.model.shape import ModelConfig, MoEConfig

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


def start_server(checkpoint: Path, workdir: Path, *, api_key: str | None = API_KEY, timeout: float = 60.0,
                 dtype: str | None = None, verbose: bool = False, **options) -> ServerProcess:
    """`gonogo serve` on a free loopback port through gonogo's own launcher; returns once /health
    answers (bounded). ``options``: GonogoServeOptions fields (threads, max_batch, ...)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if api_key is not None:
        env[KEY_ENV] = api_key
    server = start_gonogo_server(str(checkpoint), workdir, dtype=dtype, api_key_env=KEY_ENV if api_key else None,
                                 options=GonogoServeOptions(**options), env=env, verbose=verbose)
    try:
        server.wait_healthy(timeout)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def server(checkpoint_dir, tmp_path_factory):
    process = start_server(checkpoint_dir, tmp_path_factory.mktemp("server"))
    yield process
    process.stop()
