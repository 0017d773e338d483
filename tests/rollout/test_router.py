"""The router in front of two small in-process SSE backends: pinning, headers, streaming chunk by
chunk, and a weight change or detach that loses no in-flight stream. (The end-to-end tests run
the same router in front of real `gonogo serve` processes.)"""

from __future__ import annotations

import socket
import threading
import time

import httpx

from gonogo.rollout.router import BACKEND_HEADER, ROUTE_HEADER, start_router

CHUNK_GAP_S = 0.25   # the conftest backends' pause between chunks


def _stream(url: str, headers=None) -> tuple[str, list[tuple[float, str]]]:
    """-> (x-gonogo-backend, [(arrival time, data line)])."""
    lines = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={"stream": True}, headers=headers or {},
                      timeout=10) as response:
        assert response.status_code == 200
        side = response.headers[BACKEND_HEADER]
        for line in response.iter_lines():
            if line.startswith("data:"):
                lines.append((time.monotonic(), line))
    return side, lines


def test_streams_pass_through_chunk_by_chunk_with_the_backend_header(backends):
    router, server = start_router(*backends)
    try:
        side, lines = _stream(server.url, {ROUTE_HEADER: "canary"})
        assert side == "canary"
        assert [line for _, line in lines][-1] == "data: [DONE]" and len(lines) == 4
        assert "canary0" in lines[0][1]
        # the first chunk arrived while the backend was still producing the rest
        assert lines[-1][0] - lines[0][0] > 2 * CHUNK_GAP_S * 0.8
        side, _ = _stream(server.url)  # weight 0: stable
        assert side == "stable"
        records = router.all_records()
        assert [r.side for r in records] == ["canary", "stable"] and all(r.ok for r in records)
        assert records[0].pinned and not records[1].pinned
        assert records[0].ttft is not None and records[0].ttft < records[0].latency - CHUNK_GAP_S
    finally:
        server.stop()


def test_weight_change_and_detach_keep_in_flight_streams(backends):
    router, server = start_router(*backends)
    try:
        router.set_weight(100)
        result = {}
        stream = threading.Thread(target=lambda: result.update(out=_stream(server.url)))
        stream.start()
        deadline = time.monotonic() + 5
        while router.in_flight("canary") == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert router.in_flight("canary") == 1
        router.detach("canary")        # rollback while the stream is in flight
        assert _stream(server.url)[0] == "stable"   # new requests go to stable at once
        assert router.wait_drained("canary", timeout=5)
        stream.join(timeout=5)
        side, lines = result["out"]
        assert side == "canary" and lines[-1][1] == "data: [DONE]" and len(lines) == 4
        pinned = httpx.post(f"{server.url}/v1/chat/completions", json={}, headers={ROUTE_HEADER: "canary"})
        assert pinned.status_code == 503   # a detached canary takes nothing, not even pinned probes
    finally:
        server.stop()


def test_a_dead_backend_is_a_502_blamed_on_it_not_on_the_router(backends):
    with socket.socket() as probe:       # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    router, server = start_router(backends[0], dead)
    try:
        response = httpx.post(f"{server.url}/v1/chat/completions", json={}, headers={ROUTE_HEADER: "canary"})
        assert response.status_code == 502 and response.headers[BACKEND_HEADER] == "canary"
        assert router.all_records()[-1].error_source == "canary"
        assert httpx.get(f"{server.url}/router/health").status_code == 200   # the router lives on
    finally:
        server.stop()


def test_a_stream_without_text_is_blamed_on_the_side_that_sent_it(backends):
    # a model that stops at once streams [DONE] and no text: clients count the request as failed,
    # and the failure is that side's, not the router's
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    from gonogo.rollout.router import ThreadedServer

    async def chat(_request):
        async def chunks():
            yield b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
            yield b"data: [DONE]\n\n"
        return StreamingResponse(chunks(), media_type="text/event-stream")

    silent = ThreadedServer(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])).start()
    router, server = start_router(backends[0], silent.url)
    try:
        assert _stream(server.url, {ROUTE_HEADER: "canary"})[0] == "canary"
        assert _stream(server.url, {ROUTE_HEADER: "stable"})[0] == "stable"
        silent_record, talking_record = router.all_records()
        assert silent_record.error_source == "canary" and "no text" in silent_record.error
        assert silent_record.ok          # a 200: Flagger's success rate counts 5xx only
        assert talking_record.error_source is None
    finally:
        server.stop()
        silent.stop()
