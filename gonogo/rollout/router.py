"""The canary router: one loopback HTTP endpoint in front of a stable and a canary server.

Each request goes to one backend, chosen deterministically from the canary weight (percent):
request n goes to the canary when floor((n + 1)·w/100) > floor(n·w/100), so any run of 100
consecutive requests sends exactly w of them to the canary. A request header
``x-gonogo-route: stable|canary`` pins a request to one side (the quality check uses it). Every
response carries ``x-gonogo-backend: stable|canary``. Bodies are passed through chunk by chunk as
they arrive, so server-sent events (streaming completions) reach the client intact and on time.

The router records, per request, the side, status, time to first token (first SSE chunk that
carries text; the whole request when not streamed), end-to-end latency and who caused a failure
(``stable``, ``canary`` or ``router``), for the analysis. It counts in-flight requests per side,
so a backend is stopped only once the requests that started on it have finished: a weight change
affects only new requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

SIDES = ("stable", "canary")
ROUTE_HEADER = "x-gonogo-route"
BACKEND_HEADER = "x-gonogo-backend"
# hop-by-hop headers (RFC 9110 §7.6.1) and the ones the forwarding itself rewrites
_DROP_REQUEST_HEADERS = {"host", "connection", "keep-alive", "proxy-connection", "te", "trailer",
                         "transfer-encoding", "upgrade", "content-length", ROUTE_HEADER}
_DROP_RESPONSE_HEADERS = {"connection", "keep-alive", "proxy-connection", "te", "trailer",
                          "transfer-encoding", "upgrade", "content-length", "date", "server"}


@dataclass
class RequestRecord:
    side: str                  # the backend that served it ("stable" / "canary"), or "none"
    path: str
    pinned: bool               # sent with x-gonogo-route (quality checks), kept out of the latency windows
    started: float             # time.monotonic()
    ended: float = 0.0
    status: int = 0
    ttft: Optional[float] = None
    ok: bool = False
    error_source: Optional[str] = None   # "stable" | "canary" | "router" when the client saw an error
    error: str = ""

    @property
    def latency(self) -> float:
        return self.ended - self.started


@dataclass
class Backend:
    url: str
    accepting: bool = True
    in_flight: int = 0


class WeightedChoice:
    """Deterministic weighted split: exactly ``weight`` canary requests in every 100 consecutive ones."""

    def __init__(self) -> None:
        self.count = 0
        self.weight = 0

    def set_weight(self, weight: int) -> None:
        assert 0 <= weight <= 100, weight
        if weight != self.weight:
            self.weight = weight
            self.count = 0  # a fresh sequence so the new split holds from the next request on

    def next_side(self) -> str:
        n = self.count
        self.count += 1
        return "canary" if (n + 1) * self.weight // 100 > n * self.weight // 100 else "stable"


@dataclass
class _State:
    backends: dict[str, Optional[Backend]]
    choice: WeightedChoice = field(default_factory=WeightedChoice)
    records: list[RequestRecord] = field(default_factory=list)


class Router:
    """The router's state and its ASGI app. Thread-safe setters: the controller runs in another thread."""

    def __init__(self, stable_url: str, canary_url: Optional[str], *, request_timeout: float = 120.0,
                 connect_timeout: float = 5.0):
        self._lock = threading.Lock()
        self._state = _State(backends={"stable": Backend(stable_url.rstrip("/")),
                                       "canary": Backend(canary_url.rstrip("/")) if canary_url else None})
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self._client: Optional["httpx.AsyncClient"] = None  # httpx.AsyncClient, created on the server's event loop
        self.app = self._build_app()

    # -- control (called from the controller's thread) -------------------------------------
    @property
    def weight(self) -> int:
        return self._state.choice.weight

    def set_weight(self, weight: int) -> None:
        with self._lock:
            if weight > 0 and self._state.backends["canary"] is None:
                raise AssertionError("no canary backend to send traffic to")
            self._state.choice.set_weight(weight)
        log.info("canary weight %d%%", weight)

    def in_flight(self, side: str) -> int:
        backend = self._state.backends[side]
        return backend.in_flight if backend else 0

    def wait_drained(self, side: str, timeout: float) -> bool:
        """Wait (bounded) until no request is in flight on ``side``; False when time ran out."""
        deadline = time.monotonic() + timeout
        while self.in_flight(side) > 0:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def detach(self, side: str) -> None:
        """Take a backend out: no new requests (pinned ones get 503); in-flight ones finish."""
        with self._lock:
            backend = self._state.backends[side]
            if backend:
                backend.accepting = False
            if side == "canary":
                self._state.choice.set_weight(0)

    def promote(self) -> None:
        """The canary becomes the stable backend (call once the old stable has drained)."""
        with self._lock:
            canary = self._state.backends["canary"]
            assert canary is not None and self._state.choice.weight == 100
            self._state.backends["stable"] = canary
            self._state.backends["canary"] = None
            self._state.choice.set_weight(0)

    def records(self, since: float, until: float) -> list[RequestRecord]:
        """Requests that finished in [since, until) (time.monotonic()), as Prometheus' rate() sees them."""
        with self._lock:
            return [r for r in self._state.records if since <= r.ended < until]

    def all_records(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._state.records)

    # -- the data path (on the server's event loop) -----------------------------------------
    def _pick(self, pinned: Optional[str]) -> tuple[str, Optional[Backend]]:
        with self._lock:
            if pinned:
                side, backend = pinned, self._state.backends[pinned]
            else:
                side = self._state.choice.next_side()
                backend = self._state.backends[side]
                if backend is None or not backend.accepting:
                    side, backend = "stable", self._state.backends["stable"]
            if backend is not None and not backend.accepting:
                backend = None
            if backend is not None:
                backend.in_flight += 1  # counted under the lock, before any await
            return side, backend

    def _finish(self, record: RequestRecord, backend: Optional[Backend]) -> None:
        record.ended = time.monotonic()
        with self._lock:
            if backend is not None:
                backend.in_flight -= 1
            self._state.records.append(record)

    def _build_app(self):
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response, StreamingResponse
        from starlette.routing import Route

        import httpx

        async def forward(request: Request) -> Response:
            pinned = request.headers.get(ROUTE_HEADER)
            if pinned is not None and pinned not in SIDES:
                return JSONResponse({"error": {"message": f"{ROUTE_HEADER} must be stable or canary",
                                               "type": "invalid_request_error"}}, status_code=400)
            side, backend = self._pick(pinned)
            record = RequestRecord(side=side, path=request.url.path, pinned=pinned is not None,
                                   started=time.monotonic())
            if backend is None:
                record.side = "none"
                record.error_source = side if pinned else "router"
                record.error = f"no {side} backend"
                record.status = 503
                self._finish(record, None)
                return JSONResponse({"error": {"message": f"the {side} backend is not in service",
                                               "type": "server_error"}}, status_code=503,
                                    headers={BACKEND_HEADER: side})
            try:
                body = await request.body()
                headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST_HEADERS}
                target = backend.url + request.url.path + (f"?{request.url.query}" if request.url.query else "")
                assert self._client is not None  # made at start-up, before the first request
                upstream_request = self._client.build_request(request.method, target, headers=headers, content=body)
                upstream = await self._client.send(upstream_request, stream=True)
            except httpx.HTTPError as error:
                # the backend refused or timed out before answering: its failure, not the router's
                record.status = 502
                record.error_source = side
                record.error = f"{type(error).__name__}: {error}"
                self._finish(record, backend)
                return JSONResponse({"error": {"message": f"the {side} backend did not answer ({type(error).__name__})",
                                               "type": "server_error"}}, status_code=502,
                                    headers={BACKEND_HEADER: side})
            except BaseException as error:
                record.status = 500
                record.error_source = "router"
                record.error = f"{type(error).__name__}: {error}"
                self._finish(record, backend)
                raise
            record.status = upstream.status_code
            streaming = upstream.headers.get("content-type", "").startswith("text/event-stream")
            response_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE_HEADERS}
            response_headers[BACKEND_HEADER] = side
            return StreamingResponse(self._relay(upstream, record, backend, streaming),
                                     status_code=upstream.status_code, headers=response_headers)

        async def health(_request: Request) -> Response:
            return JSONResponse({"status": "ok", "weight": self.weight})

        @contextlib.asynccontextmanager
        async def lifespan(_app):
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.request_timeout, connect=self.connect_timeout),
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
            try:
                yield
            finally:
                await self._client.aclose()

        routes = [Route("/router/health", health, methods=["GET"]),
                  Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])]
        return Starlette(routes=routes, lifespan=lifespan)

    async def _relay(self, upstream, record: RequestRecord, backend: Backend, streaming: bool):
        """Yield the backend's bytes as they come; record the outcome however the stream ends."""
        import httpx

        first_text = FirstText()
        completed = False
        try:
            async for chunk in upstream.aiter_raw():
                if streaming and record.ttft is None and first_text.seen_in(chunk):
                    record.ttft = time.monotonic() - record.started
                yield chunk
            completed = True
        except httpx.HTTPError as error:
            # the backend broke the stream: the client sees a truncated response, caused by that side
            record.error_source = record.side
            record.error = f"{type(error).__name__}: {error}"
        except asyncio.CancelledError:
            # the client closed the connection (often right after [DONE]): not the backend's failure
            # (Flagger's success rate counts only 5xx)
            record.error = "client went away"
            record.ok = record.status < 500
            raise
        finally:
            await upstream.aclose()
            if completed:
                if record.ttft is None:
                    record.ttft = time.monotonic() - record.started
                    if streaming and record.status < 400:
                        # a stream that ended without text: the client (vLLM's benchmark, gonogo
                        # loadtest) counts the request as failed. It is the answering side's (a
                        # degraded model that stops at once), not the router's: the canary drill
                        # had blamed such requests on the router
                        record.error_source = record.side
                        record.error = "the stream carried no text"
                record.ok = record.status < 500
                if not record.ok:
                    record.error_source = record.side
                    record.error = f"HTTP {record.status}"
            self._finish(record, backend)
            if not completed and record.error_source is not None:
                # end the client's response abruptly (not a clean end of stream) so it sees the failure
                raise ConnectionError(f"{record.side} backend broke the response")


class FirstText:
    """Watches a relayed SSE stream, chunk by chunk (a line may span chunks), for the first line
    that carries generated text: a proxy's TTFT, measured the way vLLM's benchmark does."""

    def __init__(self) -> None:
        self._pending = b""

    def seen_in(self, chunk: bytes) -> bool:
        self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        return any(_has_text(line) for line in lines)


def _has_text(line: bytes) -> bool:
    """Whether an SSE line carries generated text (vLLM's TTFT: the first chunk with content)."""
    if not line.startswith(b"data:"):
        return False
    data = line[5:].strip()
    if not data or data == b"[DONE]":
        return False
    try:
        chunk = json.loads(data)
    except ValueError:
        return False
    for choice in chunk.get("choices") or []:
        if (choice.get("delta") or {}).get("content") or choice.get("text"):
            return True
    return False


class ThreadedServer:
    """Serve an ASGI app with uvicorn on a loopback port, in a thread of this process."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        assert host in ("127.0.0.1", "localhost", "::1"), "the router and proxies bind loopback only"
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self._socket.listen(256)
        self.url = f"http://{host}:{self._socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name=f"asgi-{self.url}", daemon=True)

    def start(self, timeout: float = 10.0) -> "ThreadedServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the server at {self.url} did not start within {timeout:.0f} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=timeout)
        if self._thread.is_alive():
            self.server.force_exit = True
            self._thread.join(timeout=timeout)
        self._socket.close()


def start_router(stable_url: str, canary_url: Optional[str], **options: Any) -> tuple[Router, ThreadedServer]:
    router = Router(stable_url, canary_url, **options)
    return router, ThreadedServer(router.app).start()

