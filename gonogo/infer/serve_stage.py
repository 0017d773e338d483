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

from gonogo.infer.engines.launch import EngineSettings, preflight
from gonogo.stages.base import StageKind, StageSettings


class ServeSettings(StageSettings):
    checkpoint: Optional[str] = None      # default: this run's newest checkpoint
    model_name: str = "gonogo"
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_batch: int = 16
    max_waiting: int = 64
    api_key_env: Optional[str] = None
    startup_timeout_s: Optional[float] = None  # default: 180 s for gonogo, 900 s for vLLM / a command
    keep_alive: bool = True               # False: stop the server at the end of this stage
    engine: EngineSettings = Field(default_factory=EngineSettings)  # "gonogo" | "vllm" | {name="command", ...}


def _stage_run(ctx, settings: ServeSettings) -> dict:
    import atexit
    import json
    import os

    import httpx

    from gonogo.errors import StageFailed
    from gonogo.infer.engines.launch import default_startup_timeout, start_engine
    from gonogo.rundir import write_json_atomic

    checkpoint = ctx.resolve_model(settings.checkpoint) or str(ctx.run_dir.root)
    headers = {}
    if settings.api_key_env:
        headers["Authorization"] = f"Bearer {os.environ.get(settings.api_key_env, '')}"
    server = start_engine(settings.engine, checkpoint, ctx.stage_dir, name="server", model_name=settings.model_name,
                          dtype=settings.dtype, api_key_env=settings.api_key_env,
                          gonogo_args=("--max-batch", str(settings.max_batch),
                                       "--max-waiting", str(settings.max_waiting)))
    try:
        url = server.wait_healthy(settings.startup_timeout_s or default_startup_timeout(settings.engine))
        startup_seconds = server.startup_seconds
        ctx.progress(f"serving {url} ({settings.engine.label})")
        payload = {"model": settings.model_name, "max_tokens": 32, "temperature": 0,
                   "messages": [{"role": "user", "content": "12+34="}]}
        with httpx.Client(timeout=120.0, headers=headers) as client:
            first = time.monotonic()
            plain = client.post(f"{url}/v1/chat/completions", json=payload)
            first_response_ms = 1000 * (time.monotonic() - first)
            if plain.status_code != 200:
                raise StageFailed(f"{url}: a chat completion failed with HTTP {plain.status_code}: {plain.text[:200]}")
            streamed = ""
            with client.stream("POST", f"{url}/v1/chat/completions", json={**payload, "stream": True}) as response:
                for line in response.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        for choice in json.loads(line[6:])["choices"]:
                            streamed += choice["delta"].get("content") or ""
        write_json_atomic(ctx.stage_dir / "server.json", {
            "url": url, "pid": server.pid, "model": settings.model_name, "checkpoint": checkpoint,
            "api_key_env": settings.api_key_env, "keep_alive": settings.keep_alive, "engine": settings.engine.name})
    except BaseException:
        server.stop()
        raise
    if settings.keep_alive:
        atexit.register(server.stop)
    else:
        server.stop()
    return {"startup_seconds": startup_seconds, "healthy": True, "first_response_ms": first_response_ms,
            "stream_matches": streamed == plain.json()["choices"][0]["message"]["content"]}


STAGE = StageKind(
    name="serve",
    description="start the OpenAI-compatible server on a loopback port, check it, keep it for later stages",
    settings=ServeSettings,
    metrics=lambda settings: {"startup_seconds", "healthy", "first_response_ms", "stream_matches"},
    run=_stage_run,
    devices=lambda settings: 1,
    preflight=lambda settings: preflight(settings.engine),
)
