"""A minimal OpenAI-compatible HTTP server on 127.0.0.1 for degraded-condition tests.

``mode="ok"`` answers chat and text completions (plain and streamed) with a fixed short text;
``mode="fail"`` answers /health and /v1/models but fails every completion with HTTP 500, as a
server whose engine broke would. It runs in a thread of the test process and is stopped by the
test (a context manager).
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

TEXT = "12 + 34 = 46 #### 46"


def _handler(mode: str, model: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep the test output clean
            pass

        def _json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._json(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": model, "object": "model"}]})
            else:
                self._json(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            request = json.loads(self.rfile.read(length) or b"{}")
            if mode == "fail":
                self._json(500, {"error": {"message": "engine failure (injected)", "type": "server_error"}})
                return
            chat = self.path == "/v1/chat/completions"
            if not request.get("stream"):
                choice = ({"index": 0, "message": {"role": "assistant", "content": TEXT}, "finish_reason": "stop"}
                          if chat else {"index": 0, "text": TEXT, "finish_reason": "stop"})
                self._json(200, {"id": "x", "object": "chat.completion" if chat else "text_completion",
                                 "model": model, "choices": [choice],
                                 "usage": {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for piece in TEXT.split(" "):
                delta = {"content": piece + " "}
                choice = {"index": 0, "delta": delta, "finish_reason": None} if chat else \
                    {"index": 0, "text": piece + " ", "finish_reason": None}
                self.wfile.write(f"data: {json.dumps({'id': 'x', 'model': model, 'choices': [choice]})}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.002)
            end = {"id": "x", "model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}}
            self.wfile.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())
            self.wfile.flush()
            self.close_connection = True

    return Handler


@contextmanager
def stub_server(mode: str = "ok", model: str = "gonogo") -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(mode, model))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
