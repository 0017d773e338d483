"""`gonogo serve --checkpoint RUN_DIR` hashes the checkpoint exactly once (issue 14's acceptance).

Before the checkpoints package, the command resolved (and re-hashed every byte of) the checkpoint
in ``load_engine`` and again in ``load_for_inference``. The server reports how many full
verifications its process made on its start-up line, and logs each one (shown with -v).
"""

import json

import torch

from gonogo.checkpoints.checkpointer import Checkpointer

from .conftest import start_server, tiny_model


def test_serve_with_a_run_dir_verifies_its_checkpoint_once(tmp_path):
    model = tiny_model()
    checkpointer = Checkpointer(tmp_path / "run" / "checkpoints" / "train")
    for step in (5, 10):  # the run's newest is the one served (and the only one hashed)
        checkpointer.save(step, model, torch.optim.AdamW(model.parameters()), None, None, {}, model.config)
    workdir = tmp_path / "serve"
    workdir.mkdir()
    server = start_server(tmp_path / "run", workdir, api_key=None, verbose=True)
    try:
        log = server.log_text()
    finally:
        server.stop()
    started = json.loads(next(line for line in log.splitlines() if line.startswith('{"serving"')))
    assert started["checkpoint_verifications"] == 1
    verified = [line for line in log.splitlines() if "verified checkpoint" in line]
    assert len(verified) == 1 and "step-00000010" in verified[0] and "(blake3)" in verified[0], log
