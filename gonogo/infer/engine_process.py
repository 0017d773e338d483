"""The engine in a process of its own, so that it shares no GIL with the HTTP server.

In one process the decode loop (a thread issuing a hundred small PyTorch ops per step, each
taking the GIL back after its kernel) and the HTTP event loop (Python for every streamed chunk)
take turns on one interpreter lock: on a 2-core CPU a thread running Python 10% of the time
slowed decoding at 8 streams by 25-35%, and `gonogo serve` streamed 8 requests at 530-650
tokens/s where the same engine in-process decoded 820-980 (bench/results/serve-epyc-avx2.md).
vLLM splits its API server and its engine core into processes for the same reason.

``EngineProcess`` has the face of ``Engine`` that the server uses (``submit``, ``check``,
``health``, ``drain``, ``stop``, the gauges); the child loads the checkpoint, runs ``Engine``
and sends each loop iteration's events in one message. Cancellations travel on the next event
of a request (a step later); the queue limit (429) is decided here from the requests in flight.
If the child dies, every request in flight gets an error event and ``health`` says so; the
child's own engine still restarts its loop after a failed step, as in one process.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from typing import Any, Optional

from gonogo.infer.engine import EngineSettings, EngineStopped, Event, QueueFull, Request, check_request
from gonogo.infer.sampling import SamplingParams

log = logging.getLogger(__name__)

READY_TIMEOUT = 600.0   # loading and verifying a checkpoint in the child
STATUS_EVERY = 0.25     # an idle child reports its gauges this often


class EngineProcess:
    """``Engine``'s serving interface, with the engine in a child process."""

    def __init__(self, checkpoint: str, settings: EngineSettings, threads: Optional[int] = None):
        context = multiprocessing.get_context("spawn")  # no forked torch state, no inherited threads
        self._conn, child_conn = context.Pipe()
        # the child logs at this process's level (`gonogo -v serve` shows its INFO lines too)
        self._process = context.Process(target=_child_main, name="gonogo-engine", daemon=True,
                                        args=(checkpoint, settings, threads, child_conn, logging.getLogger().level))
        self._process.start()
        child_conn.close()
        self.settings = settings
        ready = self._wait_ready()
        self.tokenizer = ready["tokenizer"]
        self.model_config = ready["model_config"]
        self.max_len: int = ready["max_len"]
        self.device: str = ready["device"]
        self.threads: int = ready["threads"]
        self.checkpoint_verifications: int = ready["verifications"]
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._requests: dict[str, Request] = {}
        self._ids = 0
        self._status: dict[str, Any] = {"running": 0, "waiting": 0, "healthy": True, "detail": {}}
        self._draining = False
        self._stopping = False
        self._exit: Optional[str] = None      # why the child is gone, once it is
        self._reader: Optional[threading.Thread] = None

    def _wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self._conn.poll(0.5):
                try:
                    kind, payload = self._conn.recv()
                except EOFError:
                    break
                if kind == "ready":
                    return payload
                if kind == "error":  # the child could not load the model: the user's error, as in one process
                    self._process.join(10)
                    raise payload
            elif not self._process.is_alive():
                break
        self._process.kill()
        raise RuntimeError(f"the engine process did not start (exit code {self._process.exitcode})")

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "EngineProcess":
        assert self._reader is None
        self._reader = threading.Thread(target=self._read, name="gonogo-engine-reader", daemon=True)
        self._reader.start()
        return self

    def drain(self, seconds: float) -> None:
        self._draining = True
        self._send(("drain", seconds))

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._send(("stop", timeout))
        deadline = time.monotonic() + timeout + 5
        while self._process.is_alive() and time.monotonic() < deadline:  # a signal can end one join early
            self._process.join(min(0.5, max(0.0, deadline - time.monotonic())))
        if self._process.is_alive():
            log.error("engine process did not stop within %.0f s; killing it", timeout + 5)
            self._process.kill()
            self._process.join(5)
        if self._reader is not None:
            self._reader.join(5)
        self._fail_in_flight("the server stopped")

    @property
    def accepting(self) -> bool:
        return not (self._draining or self._stopping) and self._exit is None

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    def health(self) -> tuple[bool, dict[str, Any]]:
        if self._exit is not None:
            return False, {"reason": self._exit, "code": "engine_failed"}
        if self._draining or self._stopping:
            return False, {"reason": "the server is shutting down", "code": "shutting_down"}
        status = self._status
        return bool(status["healthy"]), dict(status["detail"])

    @property
    def num_running(self) -> int:
        return int(self._status["running"])

    @property
    def num_waiting(self) -> int:
        return int(self._status["waiting"])

    # -- submitting -------------------------------------------------------------------------
    def check(self, prompt_tokens: int, params: SamplingParams) -> Optional[str]:
        return check_request(self.max_len, self.settings.max_batch, prompt_tokens, params)

    def submit(self, request: Request) -> Request:
        problem = self.check(len(request.prompt_ids), request.params)
        if problem:
            raise ValueError(problem)
        if self._exit is not None:
            raise EngineStopped(self._exit, code="engine_failed")
        if not self.accepting:
            raise EngineStopped("the server is shutting down")
        with self._lock:
            # the child admits max_batch requests (one row each, n = 1) and queues the rest
            waiting = len(self._requests) - self.settings.max_batch
            if waiting >= self.settings.max_waiting:
                raise QueueFull(f"{waiting} requests are already waiting")
            self._ids += 1
            request.request_id = request.request_id or f"req-{self._ids}"
            self._requests[request.request_id] = request
        self._send(("submit", request.request_id, request.prompt_ids, request.params))
        return request

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError):  # the child is gone: _read says why
                pass

    # -- the reader thread ------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                kind, payload = self._conn.recv()
            except (EOFError, OSError):
                break
            if kind == "events":
                events, status = payload
                self._status = status
                self._deliver(events)
            elif kind == "status":
                self._status = payload
        self._process.join(5)
        if not self._stopping:
            self._exit = f"the engine process exited (exit code {self._process.exitcode}); restart the server"
            log.error(self._exit)
        self._fail_in_flight(self._exit or "the server stopped")

    def _deliver(self, events: list[tuple[str, Event]]) -> None:
        cancelled = []
        for request_id, event in events:
            with self._lock:
                request = self._requests.get(request_id)
                if request is not None and event.done:
                    del self._requests[request_id]
            if request is None:
                continue
            if event.done or event.error is not None:
                request.completion_tokens = event.completion_tokens
                request.finished_choices = request.params.n
                request.error = event.error
            else:
                request.completion_tokens += len(event.token_ids)
            if request.cancelled and not event.done:
                cancelled.append(request_id)
            try:
                request.emit(event)
            except Exception:  # one request's callback must not stop the others' events
                log.exception("event callback of request %s failed", request_id)
        for request_id in dict.fromkeys(cancelled):
            self._send(("cancel", request_id))

    def _fail_in_flight(self, message: str) -> None:
        with self._lock:
            requests = list(self._requests.values())
            self._requests.clear()
        for request in requests:
            request.error = message
            request.emit(Event(0, "", [], "error", done=True, prompt_tokens=len(request.prompt_ids),
                               completion_tokens=request.completion_tokens, error=message))


# -- the child ---------------------------------------------------------------------------------

def _child_main(checkpoint: str, settings: EngineSettings, threads: Optional[int], conn, log_level: int) -> None:
    import dataclasses
    import os

    import torch

    # a process group of its own: a SIGTERM or Ctrl-C to the server's group reaches the parent,
    # which drains the engine and then stops it here, as in one process; were this child stopped
    # with the group, the requests in flight would fail instead of finishing. It still ends when
    # the parent is gone (the pipe closes) and on a SIGTERM of its own (multiprocessing's exit).
    os.setpgid(0, 0)
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")

    from gonogo.checkpoints import STATS
    from gonogo.infer.device import engine_threads_on_cpu
    from gonogo.infer.engine import load_engine

    try:
        if threads is not None:
            torch.set_num_threads(threads)
        # the parent decides the 429s (it sees every request in flight); the child only queues
        child_settings = dataclasses.replace(settings, max_waiting=settings.max_waiting + settings.max_batch)
        engine = load_engine(checkpoint, child_settings)
        if threads is None and str(engine.device) == "cpu":
            torch.set_num_threads(engine_threads_on_cpu())
        engine.warm_up()   # --compile: with the threads it will run with, before the parent listens
    except BaseException as error:  # noqa: BLE001 - the parent raises it (a UserError stays one)
        conn.send(("error", error))
        return
    send_lock = threading.Lock()
    outgoing: list[tuple[str, Event]] = []
    requests: dict[str, Request] = {}
    last_status = [0.0]

    def status() -> dict[str, Any]:
        healthy, detail = engine.health()
        return {"running": engine.num_running, "waiting": engine.num_waiting, "healthy": healthy, "detail": detail}

    def send(message: tuple) -> None:
        with send_lock:
            conn.send(message)

    def flush() -> None:  # the engine thread, after every iteration of its loop: one message a step
        now = time.monotonic()
        if outgoing:
            batch = outgoing[:]
            del outgoing[:len(batch)]
            send(("events", (batch, status())))
            last_status[0] = now
        elif now - last_status[0] >= STATUS_EVERY:
            send(("status", status()))
            last_status[0] = now

    def emitter(request_id: str):
        def emit(event: Event) -> None:
            outgoing.append((request_id, event))
            if event.done:
                requests.pop(request_id, None)
        return emit

    engine.on_iteration = flush
    conn.send(("ready", {"tokenizer": engine.tokenizer, "model_config": engine.model_config,
                         "max_len": engine.max_len, "device": str(engine.device),
                         "threads": torch.get_num_threads(), "verifications": STATS.verifications}))
    engine.start()
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                break
            kind = message[0]
            if kind == "submit":
                _, request_id, prompt_ids, params = message
                request = Request(prompt_ids, params, emitter(request_id), request_id=request_id)
                requests[request_id] = request
                try:
                    engine.submit(request)
                except Exception as error:  # noqa: BLE001 - this request alone fails
                    requests.pop(request_id, None)
                    outgoing.append((request_id, Event(0, "", [], "error", done=True, prompt_tokens=len(prompt_ids),
                                                       error=f"{type(error).__name__}: {error}")))
            elif kind == "cancel":
                cancelled = requests.get(message[1])
                if cancelled is not None:
                    cancelled.cancel()
            elif kind == "drain":
                engine.drain(message[1])
            elif kind == "stop":
                break
    finally:
        engine.stop()
        try:
            flush()   # the aborted requests' last events
            conn.close()
        except OSError:  # the parent is gone: nobody to tell
            pass
