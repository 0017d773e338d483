"""`gonogo serve --checkpoint RUN_DIR` hashes the checkpoint exactly once (issue 14's acceptance).

Before the checkpoints package, the command resolved (and re-hashed every byte of) the checkpoint
in ``load_engine`` and again in ``load_for_inference``. The server reports how many full
verifications its process made on its start-up line, and logs each one (shown with -v).
"""

import json

import torch

from gonogo.checkpoints.checkpointer import Checkpointer

from .conftest import start_server, tiny_model


def _served(checkpoint, workdir, **options) -> tuple[dict, list[str]]:
    """Start `gonogo serve -v` on ``checkpoint`` and stop it: its start-up line (parsed) and the
    log lines that say a checkpoint was verified."""
    workdir.mkdir()
    server = start_server(checkpoint, workdir, api_key=None, verbose=True, **options)
    try:
        log = server.log_text()
    finally:
        server.stop()
    started = json.loads(next(line for line in log.splitlines() if line.startswith('{"serving"')))
    return started, [line for line in log.splitlines() if "verified checkpoint" in line]


def test_serve_with_a_run_dir_verifies_its_checkpoint_once(tmp_path):
    model = tiny_model()
    checkpointer = Checkpointer(tmp_path / "run" / "checkpoints" / "train")
    for step in (5, 10):  # the run's newest is the one served (and the only one hashed)
        checkpointer.save(step, model, torch.optim.AdamW(model.parameters()), None, None, {}, model.config)
    started, verified = _served(tmp_path / "run", tmp_path / "serve")
    assert started["checkpoint_verifications"] == 1
    assert len(verified) == 1 and "step-00000010" in verified[0] and "(xxh3-128)" in verified[0], verified


def test_a_cpu_server_leaves_a_core_to_http_unless_told_its_threads(tmp_path):
    """Without --threads the engine computes on every core but one (the HTTP loop and the clients
    get the other: with every core, 1 stream was ~1.5x slower on 2 cores); --threads N is N."""
    import os

    cores = len(os.sched_getaffinity(0))
    model = tiny_model()
    Checkpointer(tmp_path / "run" / "checkpoints" / "train").save(
        1, model, torch.optim.AdamW(model.parameters()), None, None, {}, model.config)
    seen = {threads: _served(tmp_path / "run", tmp_path / f"serve-{threads}", threads=threads)[0]["threads"]
            for threads in (None, 2)}
    assert seen[2] == 2
    assert 1 <= seen[None] <= max(1, cores - 1)


def test_serve_with_a_run_dir_serves_what_its_serve_stage_served(tmp_path):
    """A plan's run directory: `gonogo serve --checkpoint RUN` serves the model the run's serve
    stage served (the laptop plan's finetune), not the training stage that committed last (its
    soak), and still hashes one checkpoint; a run without a serve stage keeps the newest."""
    from gonogo.checkpoints.reference import served_model
    from gonogo.rundir import write_json_atomic

    model = tiny_model()
    run = tmp_path / "run"
    finetuned = Checkpointer(run / "checkpoints" / "finetune").save(
        5, model, torch.optim.AdamW(model.parameters()), None, None, {}, model.config)
    Checkpointer(run / "checkpoints" / "soak").save(  # committed after the finetune
        9, model, torch.optim.AdamW(model.parameters()), None, None, {}, model.config)
    assert served_model(run) is None
    (run / "stages" / "serve").mkdir(parents=True)
    write_json_atomic(run / "stages" / "serve" / "server.json", {"url": "http://127.0.0.1:1", "checkpoint": str(finetuned)})
    (run / "stages" / "other").mkdir()  # a serve stage that served "this run's newest" names the run itself
    write_json_atomic(run / "stages" / "other" / "server.json", {"checkpoint": str(run)})
    assert served_model(run) == finetuned
    started, verified = _served(run, tmp_path / "serve")
    assert started["checkpoint_verifications"] == 1
    assert len(verified) == 1 and "finetune/step-00000005" in verified[0], verified
