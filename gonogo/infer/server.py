"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of the engine.

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions
(stream or not), GET /health, GET /metrics (Prometheus text), GET /openapi.json. Every bad
request is a 4xx with an OpenAI-style error body ({"error": {"message", "type", "param",
"code"}}); a 5xx means a bug, a failed engine or shutdown, and says which. A request that fails
inside the engine fails alone (500, or an error event in its stream); the engine thread is
restarted after a failure it cannot pin on one request, a bounded number of times.

Safety: binds 127.0.0.1 unless told otherwise; a Bearer key read from an environment variable
(required when binding beyond loopback); limits on body size, prompt tokens, max_tokens, n and
the waiting queue. On SIGTERM the engine takes no new requests, running ones get
``DRAIN_SECONDS`` to finish (then end with finish_reason "abort" and a clean ``[DONE]``), and
uvicorn closes once the streams are done.
"""

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Optional, Union

from gonogo.infer.protocol import (
    REFUSED_FIELDS, APIError, ChatCompletionRequest, CompletionRequest, ErrorResponse, chat_chunk, chat_response,
    completion_chunk, completion_response, new_id, now, parse_request, sse, usage_chunk)

if TYPE_CHECKING:  # the engine imports torch; this module must not (the CLI and plan checks stay fast)
    from gonogo.infer.engine import Engine, Event

log = logging.getLogger(__name__)

DRAIN_SECONDS = 10.0


@dataclass
class ServerLimits:
    max_body_bytes: int = 1 << 20        # 1 MiB of JSON is far beyond any prompt this model takes
    max_prompt_tokens: Optional[int] = None   # None = the engine's context minus one
    max_tokens: Optional[int] = None          # None = the engine's context minus one
    max_n: int = 8
    request_timeout_seconds: float = 600.0    # a response never waits longer than this


class _Timing:
    """Latencies of one request, observed into the server's histograms."""

    def __init__(self, metrics: "ServerMetrics", prompt_tokens: int):
        self.metrics = metrics
        self.started = time.monotonic()
        self.last_token: Optional[float] = None
        metrics.prompt_tokens.inc(prompt_tokens)

    def token(self, count: int, moment: float) -> None:
        if not count:
            return
        if self.last_token is None:
            self.metrics.time_to_first_token.observe(moment - self.started)
        else:
            self.metrics.inter_token_latency.observe(moment - self.last_token)
        self.last_token = moment

    def finish(self, completion_tokens: int) -> None:
        self.metrics.end_to_end_latency.observe(time.monotonic() - self.started)
        self.metrics.generation_tokens.inc(completion_tokens)


class _LoopBridge:
    """Hands events from the engine thread to the requests' asyncio queues.

    The engine thread only appends to a list; a task on the event loop collects the list every
    ``INTERVAL`` seconds while requests are open. Waking the loop from the engine thread
    (``call_soon_threadsafe``) would cost a system call per token and, worse, hand the GIL to
    the loop in the middle of a decode step: measured with py-spy, 18% of the engine thread's
    time went there with 8 streams. Polling lets the loop run while the engine is inside
    PyTorch kernels, which release the GIL. The price is at most ``INTERVAL`` per delivery.
    """

    INTERVAL = 0.002

    def __init__(self):
        import threading

        self.lock = threading.Lock()
        self.pending: list = []
        self.open_requests = 0
        self.task: Optional[asyncio.Task] = None

    def put(self, queue: asyncio.Queue, event: "Event") -> None:  # engine thread
        with self.lock:
            self.pending.append((queue, event))

    def open(self) -> None:  # event loop
        self.open_requests += 1
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._pump())

    def close(self) -> None:  # event loop
        self.open_requests -= 1

    async def _pump(self) -> None:
        while self.open_requests > 0 or self.pending:
            await asyncio.sleep(self.INTERVAL)
            with self.lock:
                pending, self.pending = self.pending, []
            for queue, event in pending:
                queue.put_nowait(event)


def _merge_by_choice(events: list) -> list:
    """Consecutive events of one request merged per choice: texts joined, the last finish kept."""
    from gonogo.infer.engine import Event

    merged: dict[int, Event] = {}
    for event in events:
        into = merged.get(event.index)
        if into is None or into.finish_reason:
            merged[event.index] = Event(event.index, event.text, list(event.token_ids), event.finish_reason,
                                        event.done, event.prompt_tokens, event.completion_tokens, event.time,
                                        event.error)
        else:
            into.text += event.text
            into.token_ids += event.token_ids
            into.finish_reason = event.finish_reason
            into.done = event.done
            into.completion_tokens = event.completion_tokens
            into.error = event.error
    # the event that finished the request goes last, so "done" still ends the stream
    return sorted(merged.values(), key=lambda event: event.done)


class _Guard:
    """Authentication, the body-size limit and the request counter, as plain ASGI middleware.

    (Starlette's decorator middleware would route every streamed chunk through extra tasks.)
    """

    def __init__(self, app, *, api_key: Optional[str], max_body_bytes: int, metrics: "ServerMetrics"):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        problem = self._problem(scope) if path.startswith("/v1/") else None
        if problem is not None:
            from fastapi.responses import JSONResponse

            self.metrics.count(path, problem.status)
            await JSONResponse(problem.body(), status_code=problem.status)(scope, receive, send)
            return

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count(path, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)

    def _problem(self, scope) -> Optional[APIError]:
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        if self.api_key is not None:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
                return APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return APIError(413, f"the request body is larger than {self.max_body_bytes} bytes",
                            code="request_too_large")
        return None


class ServerMetrics:
    """Prometheus metrics in a registry of their own (several servers may live in one process)."""

    ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, engine: "Engine"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        latency_buckets = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                           2.5, 5.0, 10.0, 30.0, 60.0)
        self.requests = Counter("gonogo_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=self.registry)
        self.time_to_first_token = Histogram("gonogo_time_to_first_token_seconds", "Time to first token",
                                             buckets=latency_buckets, registry=self.registry)
        self.inter_token_latency = Histogram("gonogo_inter_token_latency_seconds", "Time between tokens",
                                             buckets=latency_buckets, registry=self.registry)
        self.end_to_end_latency = Histogram("gonogo_e2e_request_latency_seconds", "Request latency",
                                            buckets=latency_buckets, registry=self.registry)
        self.prompt_tokens = Counter("gonogo_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.generation_tokens = Counter("gonogo_generation_tokens", "Tokens generated", registry=self.registry)
        running = Gauge("gonogo_num_requests_running", "Requests being decoded", registry=self.registry)
        running.set_function(lambda: engine.num_running)
        waiting = Gauge("gonogo_num_requests_waiting", "Requests queued for a cache row", registry=self.registry)
        waiting.set_function(lambda: engine.num_waiting)

    def count(self, path: str, status: int) -> None:
        route = path if path in self.ROUTES else "other"  # bounded label values
        self.requests.labels(route=route, status=str(status)).inc()

    def start_request(self, prompt_tokens: int) -> _Timing:
        return _Timing(self, prompt_tokens)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def create_app(engine: "Engine", *, model_name: str, api_key: Optional[str] = None,
               limits: Optional[ServerLimits] = None, metrics: Optional[ServerMetrics] = None):
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.requests import ClientDisconnect

    from gonogo.infer.engine import EngineStopped, QueueFull, Request
    from gonogo.infer.sampling import SamplingParams

    limits = limits or ServerLimits()
    metrics = metrics or ServerMetrics(engine)
    max_prompt = limits.max_prompt_tokens or engine.max_len - 1
    max_new = limits.max_tokens or engine.max_len - 1
    tokenizer = engine.tokenizer
    app = FastAPI(title="gonogo", summary="OpenAI-compatible inference server", version=_version(),
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.engine = engine
    app.state.metrics = metrics
    bridge = _LoopBridge()

    def error_response(error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(APIError)
    async def _api_error(_request: HTTPRequest, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(404)
    async def _not_found(request: HTTPRequest, _error: Exception) -> JSONResponse:
        return error_response(APIError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def _bad_method(request: HTTPRequest, error: Exception) -> JSONResponse:
        allow = (getattr(error, "headers", None) or {}).get("Allow", "")
        response = error_response(APIError(405, f"{request.method} is not allowed on {request.url.path}"
                                                + (f"; allowed: {allow}" if allow else ""),
                                           code="method_not_allowed"))
        if allow:
            response.headers["Allow"] = allow
        return response

    @app.exception_handler(Exception)
    async def _bug(request: HTTPRequest, error: Exception) -> JSONResponse:
        # a bug: still an OpenAI error body (the traceback goes to the log, not to the client)
        return error_response(APIError(500, f"internal error while serving {request.url.path}: "
                                            f"{type(error).__name__}", type="server_error", code="internal_error"))

    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes, metrics=metrics)

    async def read_body(request: HTTPRequest) -> bytes:
        """The JSON body, refusing it as soon as it passes the limit (chunked uploads have no length)."""
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            raise APIError(415, f"the request body must be JSON sent with 'Content-Type: application/json' "
                                f"(got {media_type or 'no Content-Type'})", code="unsupported_media_type")
        body = bytearray()
        try:
            async for piece in request.stream():
                body += piece
                if len(body) > limits.max_body_bytes:
                    raise APIError(413, f"the request body is larger than {limits.max_body_bytes} bytes",
                                   code="request_too_large")
        except ClientDisconnect:
            # nobody is left to answer; not a server error, so no traceback in the log
            log.info("client disconnected before sending the whole body of %s", request.url.path)
            raise APIError(400, "the client disconnected before sending the whole body",
                           code="client_disconnected") from None
        return bytes(body)

    @app.get("/health", responses={503: {"description": "the engine is draining, stopped or failed"}})
    async def health() -> Response:
        """200 while the engine serves; 503 with the reason when it does not."""
        serving, detail = engine.health()
        return JSONResponse({"status": "ok" if serving else "unavailable", **detail},
                            status_code=200 if serving else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": int(engine_created), "owned_by": "gonogo",
                "max_model_len": engine.max_len}

    @app.get("/v1/models", responses=_ERRORS_OF_GET)
    async def models() -> Response:
        """The one model this server serves."""
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}", responses={**_ERRORS_OF_GET, 404: {"model": ErrorResponse}})
    async def model(model_id: str) -> Response:
        """The served model; 404 for any other id."""
        if model_id != model_name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return JSONResponse(model_card())

    engine_created = time.time()

    def sampling_for(body: Any, prompt_tokens: int, max_tokens: Optional[int]) -> "SamplingParams":
        if body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        if prompt_tokens < 1:
            raise APIError(400, "the prompt is empty", param="prompt")
        if prompt_tokens > max_prompt:
            raise APIError(400, f"the prompt has {prompt_tokens} tokens; this server takes at most {max_prompt}",
                           param="prompt", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = engine.max_len - prompt_tokens
        if max_tokens > max_new:
            raise APIError(400, f"max_tokens={max_tokens} is above this server's limit of {max_new}",
                           param="max_tokens")
        if body.n > limits.max_n:
            raise APIError(400, f"n={body.n} is above this server's limit of {limits.max_n}", param="n")
        if body.stop is not None and any(not stop for stop in body.stop_list()):
            raise APIError(400, "stop sequences must not be empty", param="stop")
        params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                top_k=max(body.top_k, 0), seed=body.seed, stop=body.stop_list(), n=body.n,
                                ignore_eos=body.ignore_eos)
        problem = engine.check(prompt_tokens, params)
        if problem:
            param = next((name for name in ("temperature", "top_p", "top_k", "seed", "n")
                          if problem.startswith(name + "=")), "max_tokens")
            raise APIError(400, problem, param=param)
        return params

    def submit(prompt_ids: list[int], params: "SamplingParams") -> tuple["Request", asyncio.Queue]:
        events: asyncio.Queue = asyncio.Queue()
        request = Request(prompt_ids, params, lambda event: bridge.put(events, event))
        try:
            engine.submit(request)
        except QueueFull as error:
            raise APIError(429, f"the server is busy ({error}); retry later", type="rate_limit_error",
                           code="queue_full") from None
        except EngineStopped as error:
            raise APIError(503, str(error), type="server_error", code=error.code) from None
        bridge.open()  # closed by events_of when the request is over
        return request, events

    async def events_of(request: "Request", events: asyncio.Queue) -> AsyncIterator["Event"]:
        """The request's events until done, recording latency metrics; cancels it if abandoned.

        Events that are already waiting are taken together and merged per choice (text joined),
        so a busy server sends one chunk per choice per wake-up instead of one per token, as
        vLLM does under load; the usage counts stay exact.
        """
        deadline = time.monotonic() + limits.request_timeout_seconds
        timing = metrics.start_request(len(request.prompt_ids))
        done = False
        try:
            while not done:
                try:
                    first = await asyncio.wait_for(events.get(), timeout=max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    log.warning("request %s took over %.0f s; ending it", request.request_id,
                                limits.request_timeout_seconds)
                    request.cancel()
                    return
                batch = [first]
                while not events.empty():
                    batch.append(events.get_nowait())
                for event in batch:
                    timing.token(len(event.token_ids), event.time)
                    done = done or event.done
                for event in _merge_by_choice(batch):
                    yield event
        finally:
            if not done:
                request.cancel()
            bridge.close()
            timing.finish(request.completion_tokens)

    async def run_request(raw: HTTPRequest, chat: bool) -> Response:
        body = parse_request(ChatCompletionRequest if chat else CompletionRequest, await read_body(raw))
        if chat:
            messages = [{"role": message.role if message.role != "developer" else "system",
                         "content": message.text()} for message in body.messages]
            prompt_ids, _ = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            max_tokens = body.max_completion_tokens or body.max_tokens
        else:
            if isinstance(body.prompt, list):
                if any(not 0 <= token < engine.model_config.vocab_size for token in body.prompt):
                    raise APIError(400, "prompt token ids must be in [0, vocab_size)", param="prompt")
                prompt_ids = list(body.prompt)
            else:
                prompt_ids = tokenizer.encode(body.prompt)
            max_tokens = body.max_tokens if body.max_tokens is not None else 16  # OpenAI's default
        params = sampling_for(body, len(prompt_ids), max_tokens)
        request, events = submit(list(prompt_ids), params)
        request_id = new_id("chatcmpl" if chat else "cmpl")
        created = now()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = stream_chat if chat else stream_completion
            return StreamingResponse(stream(request, events, request_id, created, params.n, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts = [""] * params.n
        reasons = ["abort"] * params.n
        async for event in events_of(request, events):
            if event.error is not None:
                raise APIError(500, event.error, type="server_error", code="generation_failed")
            texts[event.index] += event.text
            if event.finish_reason:
                reasons[event.index] = event.finish_reason
        build = chat_response if chat else completion_response
        return JSONResponse(build(request_id, model_name, created, texts, reasons,
                                  len(prompt_ids), request.completion_tokens))

    async def stream_completion(request: "Request", events: asyncio.Queue, request_id: str, created: int,
                                n: int, include_usage: bool) -> AsyncIterator[bytes]:
        async for event in events_of(request, events):
            if event.error is not None:
                yield stream_error(event.error)
                yield sse("[DONE]")
                return
            if event.text or event.finish_reason:
                yield sse(completion_chunk(request_id, model_name, created, event.index, event.text,
                                           event.finish_reason, include_usage))
        if include_usage:
            yield sse(usage_chunk(request_id, model_name, created, "text_completion",
                                  len(request.prompt_ids), request.completion_tokens))
        yield sse("[DONE]")

    async def stream_chat(request: "Request", events: asyncio.Queue, request_id: str, created: int,
                          n: int, include_usage: bool) -> AsyncIterator[bytes]:
        first = True
        async for event in events_of(request, events):
            if event.error is not None:
                yield stream_error(event.error)
                yield sse("[DONE]")
                return
            if first:  # the first chunk of each choice carries the role; sent once generation began, as vLLM does
                first = False
                for index in range(n):
                    yield sse(chat_chunk(request_id, model_name, created, index,
                                         {"role": "assistant", "content": ""}, None, include_usage))
            if event.text:
                yield sse(chat_chunk(request_id, model_name, created, event.index, {"content": event.text},
                                     None, include_usage))
            if event.finish_reason:
                yield sse(chat_chunk(request_id, model_name, created, event.index, {}, event.finish_reason,
                                     include_usage))
        if include_usage:
            yield sse(usage_chunk(request_id, model_name, created, "chat.completion.chunk",
                                  len(request.prompt_ids), request.completion_tokens))
        yield sse("[DONE]")

    def stream_error(message: str) -> bytes:
        # the status line went out with the first chunk: the error travels as an event, as vLLM
        # sends it (the openai client raises an APIError on a chunk holding "error")
        return sse(APIError(500, message, type="server_error", code="generation_failed").body())

    @app.post("/v1/completions", openapi_extra=_body_of(CompletionRequest), responses=_ERRORS_OF_POST)
    async def completions(raw: HTTPRequest) -> Response:
        """A text completion (OpenAI's legacy completions API); streamed as server-sent events if asked."""
        return await run_request(raw, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=_body_of(ChatCompletionRequest), responses=_ERRORS_OF_POST)
    async def chat_completions(raw: HTTPRequest) -> Response:
        """A chat completion; streamed as server-sent events if asked."""
        return await run_request(raw, chat=True)

    # the server's own limits in the document too, so that a client (or a fuzzer) reads them there
    _describe_api(app, model_name=model_name, secured=api_key is not None,
                  limits={"max_tokens": max_new, "max_completion_tokens": max_new,
                          "n": min(limits.max_n, engine.settings.max_batch)},
                  vocab_size=engine.model_config.vocab_size)
    return app


_ERRORS_OF_GET: dict[Union[int, str], dict[str, Any]] = {401: {"model": ErrorResponse}}
_ERRORS_OF_POST: dict[Union[int, str], dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 415, 429, 500, 503)}


def _body_of(model: type) -> dict[str, Any]:
    """The request body in the OpenAPI document: the routes read it themselves (bounded parsing)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _describe_api(app, *, model_name: str, secured: bool, limits: dict[str, int], vocab_size: int) -> None:
    """FastAPI's OpenAPI document plus the request models the POST routes parse by hand."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes,
                               description="Fields not listed are ignored, except these, which are refused "
                                           "with a 400 unless at their off value: "
                                           + ", ".join(sorted(REFUSED_FIELDS)) + ".")
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for model in (CompletionRequest, ChatCompletionRequest):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            # the one model this server serves: any other name is a 404
            schema["properties"]["model"] = {"type": "string", "enum": [model_name], "title": "Model"}
            properties = schema["properties"]
            for name, most in limits.items():
                for variant in _variants(properties.get(name)):
                    if variant.get("type") == "integer":
                        variant["maximum"] = most
            # what the routes' own checks refuse (run_request, sampling_for, the validators)
            for variant in _variants(properties.get("stop")) + _variants(properties.get("prompt")):
                if variant.get("type") == "string":
                    variant["minLength"] = 1
                elif variant.get("type") == "array":
                    variant["minItems"] = 1
                    items = variant.get("items", {})
                    if items.get("type") == "string":
                        items["minLength"] = 1
                    elif items.get("type") == "integer":
                        items.update(minimum=0, maximum=vocab_size - 1)
            for variant in _variants(properties.get("stop")):
                if variant.get("type") == "array":
                    variant["maxItems"] = 4
            for variant in _variants(properties.get("prompt")):
                if variant.get("type") == "array" and variant.get("items", {}).get("type") == "string":
                    variant["maxItems"] = 1
            schemas[model.__name__] = schema
        if secured:
            document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, operations in document["paths"].items():
                if path.startswith("/v1/"):
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
        app.openapi_schema = document
        return document

    app.openapi = openapi


def _variants(field: Optional[dict[str, Any]]) -> list[dict[str, Any]]:
    """The alternatives of a JSON schema (its anyOf), or the schema itself."""
    if field is None:
        return []
    return list(field.get("anyOf", [field]))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gonogo")
    except PackageNotFoundError:
        return "unknown"
