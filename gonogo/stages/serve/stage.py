"""The stage kind `serve`: start `gonogo serve` for the plan's later stages.

The server outlives its stage: later stages (loadtest, canary) read its URL from
stages/<name>/server.json. It is stopped when the plan's process exits (atexit), and it stops
itself when that process dies without running atexit (the --parent-pid watch).
``keep_alive = false`` stops it at the end of the stage instead.

``engine`` chooses the server (gonogo's own, vLLM, or a command; see gonogo/infer/engines/):
the checks and the later stages are the same whichever engine serves.
"""

from __future__ import annotations

import time
from typing import Literal, Optional

from pydantic import Field

from gonogo.infer.engines.start import EngineSettings, preflight
from gonogo.stages.base import StageKind, StageSettings, own_command


class ServeSettings(StageSettings):
    checkpoint: Optional[str] = None      # default: this run's newest checkpoint
    model_name: str = "gonogo"
    dtype: Optional[Literal["float32", "bfloat16"]] = None   # None: bfloat16 on a GPU, float32 on the CPU
    device: str = "auto"                  # auto: the first GPU when there is one, else the CPU
    max_batch: int = 16
    max_waiting: int = 64
    engine_process: bool = True           # gonogo's engine in a process of its own; false: `serve --no-engine-process`
    compile: bool = False                 # gonogo's engine: torch.compile the decode step (`serve --compile`)
    api_key_env: Optional[str] = None
    startup_timeout_s: Optional[float] = None  # default: 180 s for gonogo, 900 s for vLLM / a command
    keep_alive: bool = True               # False: stop the server at the end of this stage
    engine: EngineSettings = Field(default_factory=EngineSettings)  # "gonogo" | "vllm" | {name="command", ...}


def run(ctx, settings: ServeSettings) -> dict:
    import atexit
    import os

    import httpx

    from gonogo.infer.engines.start import GonogoServeOptions, default_startup_timeout, start_engine
    from gonogo.rundir import write_json_atomic

    checkpoint = ctx.resolve_model(settings.checkpoint) or str(ctx.run_dir.root)
    headers = {}
    if settings.api_key_env:
        headers["Authorization"] = f"Bearer {os.environ.get(settings.api_key_env, '')}"
    server = start_engine(settings.engine, checkpoint, ctx.stage_dir, name="server", model_name=settings.model_name,
                          dtype=settings.dtype, api_key_env=settings.api_key_env,
                          gonogo_options=GonogoServeOptions(device=settings.device, max_batch=settings.max_batch,
                                                            max_waiting=settings.max_waiting,
                                                            engine_process=settings.engine_process,
                                                            compile=settings.compile))
    try:
        url = server.wait_healthy(settings.startup_timeout_s or default_startup_timeout(settings.engine))
        startup_seconds = server.startup_seconds
        ctx.progress(f"serving {url} ({settings.engine.label})")
        with httpx.Client(timeout=120.0, headers=headers) as client:
            checks, first_response_ms, streamed, plain = health_checks(
                client, url, settings.model_name, settings.engine.health_path or "/health")
        checks["process alive after the checks"] = server.alive()
        write_json_atomic(ctx.stage_dir / "health.json", checks)
        healthy = all(checks.values())
        if healthy:
            write_json_atomic(ctx.stage_dir / "server.json", {
                "url": url, "pid": server.pid, "model": settings.model_name, "checkpoint": checkpoint,
                "api_key_env": settings.api_key_env, "keep_alive": settings.keep_alive,
                "engine": settings.engine.name})
    except BaseException:
        server.stop()
        raise
    if settings.keep_alive and healthy:
        atexit.register(server.stop)
    else:
        server.stop()  # an unhealthy server is not left for later stages
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


def health_checks(client, url: str, model_name: str, health_path: str = "/health"):
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

    health = get(health_path)
    # vLLM answers 200 with an empty body; gonogo's server says {"status": "ok", ...}
    checks[f"{health_path} answers ok"] = bool(health is not None and health.status_code == 200
                                               and _json(health).get("status", "ok") == "ok")
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
    pieces: list[str] = []
    done = False
    try:
        with client.stream("POST", f"{url}/v1/chat/completions", json={**payload, "stream": True}) as response:
            if response.status_code == 200:
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        for choice in json.loads(line[6:])["choices"]:
                            pieces.append(choice["delta"].get("content") or "")
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        done = False
    # a stream that failed, was refused or never said [DONE] streamed nothing usable
    streamed: Optional[str] = "".join(pieces) if done else None
    checks["a streamed chat completion ends with [DONE]"] = streamed is not None
    return checks, first_response_ms, streamed, plain_text


def _json(response) -> dict:
    try:
        value = response.json()
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


STAGE = StageKind(
    name="serve",
    description="start the OpenAI-compatible server on a loopback port, check it, keep it for later stages",
    settings=ServeSettings,
    metrics=lambda settings: {"startup_seconds", "healthy", "first_response_ms", "stream_matches",
                              "health_checks_failed"},
    run=run,
    devices=lambda settings: 1,
    preflight=lambda settings: preflight(settings.engine),
    command=own_command("gonogo.infer.serve_command"),
)
