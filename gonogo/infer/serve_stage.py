"""The stage kind `serve`: start `gonogo serve` for the plan's later stages.

The server outlives its stage: later stages (loadtest, canary) read its URL from
stages/<name>/server.json. It is stopped when the plan's process exits (atexit), and it stops
itself when that process dies without running atexit (the --parent-pid watch).
``keep_alive = false`` stops it at the end of the stage instead.
"""

from __future__ import annotations

import time
from typing import Literal, Optional

from gonogo.stages.base import StageKind, StageSettings


class ServeSettings(StageSettings):
    checkpoint: Optional[str] = None      # default: this run's newest checkpoint
    model_name: str = "gonogo"
    dtype: Optional[Literal["float32", "bfloat16"]] = None   # None: bfloat16 on a GPU, float32 on the CPU
    device: str = "auto"                  # auto: the first GPU when there is one, else the CPU
    max_batch: int = 16
    max_waiting: int = 64
    api_key_env: Optional[str] = None
    startup_timeout_s: float = 180.0
    keep_alive: bool = True               # False: stop the server at the end of this stage


def _stage_run(ctx, settings: ServeSettings) -> dict:
    import atexit
    import os
    import subprocess
    import sys

    import httpx

    from gonogo.procs import stop_group
    from gonogo.rundir import write_json_atomic

    checkpoint = ctx.resolve_model(settings.checkpoint) or str(ctx.run_dir.root)
    ready = ctx.stage_dir / "ready.json"
    ready.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "gonogo", "serve", "--checkpoint", checkpoint, "--port", "0",
            "--model-name", settings.model_name, "--device", settings.device, "--max-batch", str(settings.max_batch),
            "--max-waiting", str(settings.max_waiting), "--ready-file", str(ready), "--parent-pid", str(os.getpid())]
    if settings.dtype:
        argv += ["--dtype", settings.dtype]
    headers = {}
    if settings.api_key_env:
        argv += ["--api-key-env", settings.api_key_env]
        headers["Authorization"] = f"Bearer {os.environ.get(settings.api_key_env, '')}"
    log_path = ctx.stage_dir / "server.log"
    started = time.monotonic()
    with log_path.open("a") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    try:
        url = wait_healthy(process, ready, log_path, settings.startup_timeout_s)
        startup_seconds = time.monotonic() - started
        ctx.progress(f"serving {url}")
        with httpx.Client(timeout=120.0, headers=headers) as client:
            checks, first_response_ms, streamed, plain = health_checks(client, url, settings.model_name)
        checks["process alive after the checks"] = process.poll() is None
        write_json_atomic(ctx.stage_dir / "health.json", checks)
        healthy = all(checks.values())
        if healthy:
            write_json_atomic(ctx.stage_dir / "server.json", {
                "url": url, "pid": process.pid, "model": settings.model_name, "checkpoint": checkpoint,
                "api_key_env": settings.api_key_env, "keep_alive": settings.keep_alive})
    except BaseException:
        stop_group(process)
        raise
    if settings.keep_alive and healthy:
        atexit.register(stop_group, process)
    else:
        stop_group(process)  # an unhealthy server is not left for later stages
    metrics: dict = {"startup_seconds": startup_seconds, "healthy": healthy, "first_response_ms": first_response_ms,
                     "stream_matches": None if plain is None or streamed is None else streamed == plain,
                     "health_checks_failed": [name for name, passed in checks.items() if not passed]}
    unknown = {}
    if metrics["stream_matches"] is None:
        unknown["stream_matches"] = "the plain or the streamed completion failed, so there is nothing to compare"
    if first_response_ms is None:
        unknown["first_response_ms"] = "the first chat completion failed"
    if unknown:
        metrics["unknown"] = unknown
    return metrics


def health_checks(client, url: str, model_name: str):
    """The serve stage's health: each check by name -> passed, measured against the running server.

    /health says ok, /v1/models lists the model, a chat completion answers 200 with text, and the
    same request streamed ends with [DONE]. Returns (checks, first response ms or None, streamed
    text or None, plain text or None); a failed request is a failed check, never an exception.
    """
    import json

    import httpx

    checks: dict[str, bool] = {}

    def get(path: str):
        try:
            return client.get(f"{url}{path}")
        except httpx.HTTPError:
            return None

    health = get("/health")
    checks["/health answers ok"] = bool(health is not None and health.status_code == 200
                                        and _json(health).get("status") == "ok")
    models = get("/v1/models")
    listed = [entry.get("id") for entry in _json(models).get("data", [])] if models is not None else []
    checks["/v1/models lists the model"] = model_name in listed
    payload = {"model": model_name, "max_tokens": 32, "temperature": 0,
               "messages": [{"role": "user", "content": "12+34="}]}
    plain_text, first_response_ms = None, None
    try:
        first = time.monotonic()
        plain = client.post(f"{url}/v1/chat/completions", json=payload)
        if plain.status_code == 200:
            first_response_ms = 1000 * (time.monotonic() - first)
            plain_text = plain.json()["choices"][0]["message"]["content"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        pass
    checks["a chat completion answers 200 with text"] = bool(plain_text)
    streamed: "str | None" = ""
    done = False
    try:
        with client.stream("POST", f"{url}/v1/chat/completions", json={**payload, "stream": True}) as response:
            if response.status_code != 200:
                streamed = None
            else:
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        for choice in json.loads(line[6:])["choices"]:
                            streamed += choice["delta"].get("content") or ""
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        streamed = None
    if not done:
        streamed = None
    checks["a streamed chat completion ends with [DONE]"] = streamed is not None
    return checks, first_response_ms, streamed, plain_text


def _json(response) -> dict:
    try:
        value = response.json()
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def wait_healthy(process, ready, log_path, timeout: float) -> str:
    """The URL of a `gonogo serve --ready-file` child once it answers /health (bounded by ``timeout``).

    StageFailed with the tail of its log if the child exits first, or when the time is up.
    """
    import json

    import httpx

    from gonogo.errors import StageFailed

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-1500:]
            raise StageFailed(f"the server exited with code {process.returncode} during start-up:\n{tail}")
        if ready.is_file():
            url = json.loads(ready.read_text())["url"]
            try:
                if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    raise StageFailed(f"the server did not answer /health within {timeout:.0f} s; see {log_path}")


STAGE = StageKind(
    name="serve",
    description="start the OpenAI-compatible server on a loopback port, check it, keep it for later stages",
    settings=ServeSettings,
    metrics=lambda settings: {"startup_seconds", "healthy", "first_response_ms", "stream_matches",
                              "health_checks_failed"},
    run=_stage_run,
    devices=lambda settings: 1,
)
