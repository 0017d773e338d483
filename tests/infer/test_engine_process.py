"""`gonogo serve`'s engine in a child process (the default, no GIL shared with HTTP): requests
refused and cancelled across the process boundary, a dead child answered for, not hung on; and the
same API tests as test_server.py run against `--no-engine-process`, the engine in the server's own
process."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from gonogo.infer.engine import EngineSettings, Request
from gonogo.infer.engine_process import EngineProcess
from gonogo.infer.sampling import SamplingParams

from .conftest import API_KEY, REPO_ROOT, start_server
# the API tests of test_server.py, run here against this module's server: the in-process engine
from .test_server import (  # noqa: F401
    client,
    test_completions_streamed_and_not,
    test_metrics_are_prometheus_text,
    test_n_choices_with_seed,
    test_openai_client_sees_a_typed_error,
    test_raw_sse_format,
    test_streamed_chat_equals_non_streamed_greedy_chat,
)

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(checkpoint_dir, tmp_path_factory):
    process = start_server(checkpoint_dir, tmp_path_factory.mktemp("server"), engine_process=False)
    yield process
    process.stop()


def _ready_line(server) -> dict:
    return next(json.loads(line) for line in server.log_text().splitlines() if line.startswith('{"serving"'))


def _engine_child(server_pid: int) -> int:
    """The pid of the server's engine process (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    for pid in children:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "spawn_main" in command and "resource_tracker" not in command:
            return int(pid)
    raise AssertionError(f"no engine process among {children}")


def test_the_engine_runs_in_a_child_process_by_default(checkpoint_dir, tmp_path):
    default = start_server(checkpoint_dir, tmp_path)
    try:
        ready = _ready_line(default)
        assert ready["engine_process"] is True
        assert _engine_child(default.process.pid) != default.process.pid
        # the checkpoint is hashed once in all, by the child that loads it (docs/checkpoint.md)
        assert ready["checkpoint_verifications"] == 1
    finally:
        default.stop()


def test_no_engine_process_keeps_the_engine_in_the_server(server):
    ready = _ready_line(server)
    assert ready["engine_process"] is False and ready["checkpoint_verifications"] == 1
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert not any(b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes() for child in children), children


def test_a_cancelled_request_stops_in_the_child(checkpoint_dir):
    engine = EngineProcess(str(checkpoint_dir), EngineSettings(max_batch=2)).start()
    try:
        events: queue.Queue = queue.Queue()
        request = Request([65, 66, 67], SamplingParams(max_tokens=240, temperature=0.0, ignore_eos=True), events.put)
        engine.submit(request)
        seen = []
        while True:
            event = events.get(timeout=60)
            seen.append(event)
            if len(seen) == 3:
                request.cancel()   # as the server does when its client goes away
            if event.done:
                break
        assert seen[-1].finish_reason == "abort"
        assert 3 <= request.completion_tokens < 200, request.completion_tokens
        # the engine is free again: a new request is served in full
        assert engine.num_running in (0, 1)
        done: queue.Queue = queue.Queue()
        engine.submit(Request([65], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), done.put))
        while not (event := done.get(timeout=60)).done:
            pass
        assert event.finish_reason == "length" and event.completion_tokens == 4
    finally:
        engine.stop()
    assert not engine.alive


def test_a_dead_engine_process_fails_its_requests_and_the_health_check(checkpoint_dir, tmp_path):
    server = start_server(checkpoint_dir, tmp_path, engine_process=True)
    lines: list[str] = []
    first_chunk = threading.Event()

    def stream() -> None:
        body = {"model": "gonogo", "prompt": "Q: 1+1= A:", "max_tokens": 240, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60, headers=HEADERS) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    first_chunk.set()
                    time.sleep(0.05)   # a slow reader: the request is still running when the child dies

    try:
        thread = threading.Thread(target=stream)
        thread.start()
        assert first_chunk.wait(30)
        os.kill(_engine_child(server.process.pid), signal.SIGKILL)
        thread.join(timeout=60)
        assert not thread.is_alive()
        assert lines[-1] == "data: [DONE]"
        assert "engine process exited" in json.loads(lines[-2][6:])["error"]["message"], lines[-2]
        health = httpx.get(f"{server.url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["code"] == "engine_failed", health.text
        refused = httpx.post(f"{server.url}/v1/completions", json={"model": "gonogo", "prompt": "hi", "max_tokens": 2},
                             headers=HEADERS, timeout=30)
        assert refused.status_code == 503 and "engine process exited" in refused.text
        assert server.alive   # the HTTP server answers for its engine; it does not hang or vanish
    finally:
        server.stop()


def test_a_checkpoint_that_cannot_load_is_a_clear_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-m", "gonogo", "serve", "--engine-process", "--port", "0",
                             "--checkpoint", str(tmp_path / "missing")], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-1500:]
    assert "missing" in result.stderr


def test_serve_compile_compiles_before_listening_and_answers_as_the_eager_server(checkpoint_dir, tmp_path,
                                                                                  monkeypatch, server):
    """`gonogo serve --compile`: the engine child compiles its decode step with the threads it runs
    with, before the server answers; a greedy completion is the eager server's, token for token."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # nothing half-written from elsewhere
    compiled = start_server(checkpoint_dir, tmp_path / "compiled", threads=1, compile=True, timeout=180.0)
    try:
        ready = _ready_line(compiled)
        assert ready["compiled"] is True and ready["engine_process"] is True and ready["threads"] == 1
        assert _ready_line(server)["compiled"] is False
        body = {"model": "gonogo", "prompt": "Q: 12+30= A:", "max_tokens": 40, "temperature": 0}
        answers = [httpx.post(f"{s.url}/v1/completions", json=body, headers=HEADERS, timeout=60).json()
                   for s in (compiled, server)]
        assert answers[0]["choices"][0]["text"] == answers[1]["choices"][0]["text"]
        assert answers[0]["usage"]["completion_tokens"] == 40
    finally:
        compiled.stop()


def test_serve_compile_on_a_model_it_cannot_compile_is_a_clear_error(tmp_path):
    from .conftest import tiny_model, write_checkpoint

    moe = write_checkpoint(tmp_path / "moe" / "step-00000010", tiny_model(moe=True))
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-m", "gonogo", "serve", "--compile", "--port", "0",
                             "--checkpoint", str(moe)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-1500:]
    assert "--compile supports dense models only" in result.stderr and "without --compile" in result.stderr
    assert "Traceback" not in result.stderr
