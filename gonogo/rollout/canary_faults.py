"""Faults for the canary drills: a fault-injecting HTTP proxy, and a degraded checkpoint.

``FaultProxy`` sits in front of any OpenAI-compatible server (ours or vLLM) and makes it look
bad in one of three ways: added latency before each response, a share of requests answered with
HTTP 503 (never reaching the server), and a share of connections dropped in the middle of the
response. Shares are deterministic (request n is hit when floor((n+1)·rate) > floor(n·rate)),
so a drill gives the same outcome on every run.

``write_degraded_checkpoint`` makes a model that only a quality check can catch: it answers as
fast as the original and without errors, but its weights are rounded to a few bits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Optional

from gonogo.rollout.router import ThreadedServer

log = logging.getLogger(__name__)

FAULT_HEADER = "x-gonogo-fault"


class _Share:
    """Deterministic 'rate of all requests': request n is chosen when floor((n+1)r) > floor(nr)."""

    def __init__(self, rate: float):
        assert 0.0 <= rate <= 1.0, rate
        self.rate = rate
        self.count = 0

    def hit(self) -> bool:
        n = self.count
        self.count += 1
        return int((n + 1) * self.rate) > int(n * self.rate)


class FaultProxy:
    """A loopback proxy to ``upstream`` that adds latency, 5xx answers and dropped connections."""

    def __init__(self, upstream: str, *, latency_s: float = 0.0, error_rate: float = 0.0,
                 drop_rate: float = 0.0, error_status: int = 503):
        if latency_s < 0 or not 0 <= error_rate <= 1 or not 0 <= drop_rate <= 1:
            raise ValueError("latency_s must be >= 0 and error_rate, drop_rate within [0, 1]")
        self.upstream = upstream.rstrip("/")
        self.latency_s = latency_s
        self.errors = _Share(error_rate)
        self.drops = _Share(drop_rate)
        self.error_status = error_status
        self.injected = {"latency": 0, "error": 0, "drop": 0}
        self._server: Optional[ThreadedServer] = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the proxy first"
        return self._server.url

    def start(self) -> "FaultProxy":
        self._server = ThreadedServer(self._build_app()).start()
        log.info("fault proxy %s -> %s (latency %.3f s, 5xx %.2f, drop %.2f)", self._server.url,
                 self.upstream, self.latency_s, self.errors.rate, self.drops.rate)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def _build_app(self):
        import httpx
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response, StreamingResponse
        from starlette.routing import Route

        state: dict = {}

        @contextlib.asynccontextmanager
        async def lifespan(_app):
            state["client"] = httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=5.0))
            try:
                yield
            finally:
                await state["client"].aclose()

        async def forward(request: Request) -> Response:
            # only the API is faulty; /health stays honest so a server still "starts"
            faulty = request.url.path.startswith("/v1/") and request.url.path != "/v1/models"
            if faulty and self.latency_s > 0:
                self.injected["latency"] += 1
                await asyncio.sleep(self.latency_s)
            if faulty and self.errors.hit():
                self.injected["error"] += 1
                return JSONResponse({"error": {"message": "injected fault", "type": "server_error"}},
                                    status_code=self.error_status, headers={FAULT_HEADER: "error"})
            drop = faulty and self.drops.hit()
            headers = {k: v for k, v in request.headers.items()
                       if k.lower() not in ("host", "content-length", "connection", "transfer-encoding")}
            query = f"?{request.url.query}" if request.url.query else ""
            upstream = await state["client"].send(
                state["client"].build_request(request.method, self.upstream + request.url.path + query,
                                              headers=headers, content=await request.body()),
                stream=True)
            response_headers = {k: v for k, v in upstream.headers.items()
                                if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server")}

            async def relay():
                try:
                    sent = 0
                    async for chunk in upstream.aiter_raw():
                        if drop and sent > 0:
                            self.injected["drop"] += 1
                            # an exception after the response started makes uvicorn close the socket
                            raise ConnectionAbortedError("injected dropped connection")
                        sent += 1
                        yield chunk
                    if drop:  # a one-chunk body: drop before its end anyway
                        self.injected["drop"] += 1
                        raise ConnectionAbortedError("injected dropped connection")
                finally:
                    await upstream.aclose()

            return StreamingResponse(relay(), status_code=upstream.status_code, headers=response_headers)

        return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST"])], lifespan=lifespan)


def write_degraded_checkpoint(source: str | Path, destination: Path, *, bits: int = 2) -> Path:
    """A copy of ``source`` with every matrix rounded to ``bits`` bits (per-row absmax, symmetric).

    Norm weights and the expert bias keep full precision: the model still runs and answers at the
    same speed, only worse. Written like a committed checkpoint (weights, meta.json, manifest).
    """
    import torch
    from safetensors.torch import save_file

    from gonogo.checkpoints import manifest
    from gonogo.infer.device import load_for_inference

    if bits < 1 or bits > 8:
        raise ValueError(f"bits={bits}: give 1 to 8")
    model, config, meta = load_for_inference(source)
    levels = max(2 ** (bits - 1) - 1, 1)   # 2 bits -> {-1, 0, 1} · scale
    weights = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().clone()
        if tensor.is_floating_point() and tensor.dim() >= 2:
            scale = tensor.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / levels
            tensor = torch.round(tensor / scale).clamp(-levels, levels) * scale
        weights[name] = tensor.contiguous()
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=False)
    save_file(weights, str(destination / "model.safetensors"))
    meta = {**meta, "degraded": {"from": str(source), "bits": bits}}
    (destination / "meta.json").write_text(json.dumps(meta, indent=2))
    manifest.commit(destination)
    return destination
