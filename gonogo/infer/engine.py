"""The inference engine: KV cache, continuous batching, and a background thread that runs it.

One thread owns the model and the cache. Requests arrive on a queue; between two decode steps
the thread admits waiting requests (a prefill each, written into free cache rows) and drops
finished ones, so the running batch changes every step: continuous batching. Every generated
piece of text goes to the request's ``emit`` callback; the server turns those into an asyncio
stream with ``loop.call_soon_threadsafe``.

Failures: parameters the numerics cannot take are refused at ``submit`` (``SamplingParams.problem``);
anything that still goes wrong in one request's prefill, sampling or text decoding ends that
request alone with an error event (finish_reason "error") while the batch carries on. A failure
that belongs to no single request (a batched forward raising) fails the requests in the batch
and restarts the loop, at most ``EngineSettings.max_restarts`` times; then ``failure`` is set and
the engine refuses work, saying why.

Speed: every request admitted between two decode steps is prefilled in ONE forward (its prompt
right-padded to the longest; each row's cache length is its own prompt's, so the padding is never
attended to), then every running sequence decodes in ONE forward per step; the KV cache is
preallocated (gonogo/infer/cache.py: no copies per step); greedy rows pick their tokens with one
argmax for the whole batch. A prefill that raises is retried request by request, so a failure is
still pinned on the one request it belongs to.

Determinism: a prefill reads only its own prompt (causal, padding after it), a decode step reads
each row's own cache with an exact mask, and each sequence samples with its own seeded generator,
so greedy output (and seeded sampling) is the same alone or batched, up to float rounding in
batched matmuls.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch

from gonogo.infer.cache import KVCache
from gonogo.infer.device import choose_device, inference_dtype, place
from gonogo.infer.fast_decode import FastDecoder, attended_length, compile_decode_step, maybe_fast
from gonogo.infer.sampling import SamplingParams, TextTracker, make_generator, sample_next
from gonogo.model.decoder import Decoder

log = logging.getLogger(__name__)



class QueueFull(Exception):
    """More requests are waiting than the engine's ``max_waiting``: the server answers 429."""


class EngineStopped(Exception):
    """The engine is draining, stopped or failed and takes no new requests: the server answers 503."""

    def __init__(self, message: str, code: str = "shutting_down"):
        super().__init__(message)
        self.code = code


class RequestFailed(RuntimeError):
    """One request failed inside the engine (its sampling or decoding); the others carry on."""


@dataclass
class EngineSettings:
    max_batch: int = 16                  # sequences decoded together (cache rows)
    max_len: Optional[int] = None        # tokens per sequence, prompt included; None = model's
    # None: bf16 on a GPU, fp32 on the CPU (gonogo/infer/device.py)
    dtype: Optional[Literal["float32", "bfloat16"]] = None
    device: Optional[str] = None         # None/"auto": the first GPU when there is one, else the CPU
    max_waiting: int = 64                # queued requests beyond this are refused (429)
    fused: bool = True                   # the fused inference forward (gonogo/infer/fast_decode.py)
    # torch.compile the decode step (FastDecoder.decode_step), compiled when the engine starts:
    # fewer, fused kernels per token; dense models on the fused path only (docs/serving.md)
    compile: bool = False
    # times the engine thread is restarted after a failure it could not pin on one request;
    # bounded so that a broken model ends in a truthful 503 instead of a restart loop
    max_restarts: int = 3


@dataclass
class Event:
    """Something that happened to one choice of a request."""

    index: int                           # the choice (0 .. n-1)
    text: str = ""                       # newly final text
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" when the choice ended
    # set on the event that finishes the last choice: the whole request is done
    done: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    time: float = field(default_factory=time.monotonic)   # when the engine produced it
    error: Optional[str] = None          # the request failed (finish_reason "error"); why


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    request_id: str = ""
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)
    # filled in by the engine
    finished_choices: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None

    def cancel(self) -> None:
        """The client went away: the engine drops the request's sequences at the next step."""
        self.cancelled = True


@dataclass
class _Sequence:
    request: Request
    index: int
    generator: torch.Generator
    tracker: TextTracker
    next_token: int = -1                 # sampled, not yet fed to the model
    generated: int = 0


@dataclass
class Completion:
    """The result of ``Engine.generate`` for one choice."""

    text: str
    token_ids: list[int]
    finish_reason: str


class Engine:
    def __init__(self, model: Decoder, tokenizer: Any, settings: EngineSettings | None = None,
                 *, stop_token_ids: Optional[set[int]] = None):
        settings = settings or EngineSettings()
        config = model.config
        self.settings = settings
        self.tokenizer = tokenizer
        self.model_config = config
        self.max_len = min(settings.max_len or config.max_seq_len, config.max_seq_len)
        device = choose_device(settings.device)
        self.device = device
        self.dtype = inference_dtype(device, settings.dtype)
        cache_bytes = (2 * config.n_layers * settings.max_batch * config.n_kv_heads * self.max_len
                       * config.head_dim * self.dtype.itemsize)
        self.model = place(model, device, self.dtype, extra_bytes=cache_bytes,
                           what=f"the model with a KV cache of {settings.max_batch} x {self.max_len} tokens")
        self.forward = maybe_fast(self.model, settings.fused)
        self._compiled_step: Optional[Callable[..., torch.Tensor]] = None
        if settings.compile:
            self._compiled_step = compile_decode_step(self.forward, fused=settings.fused)
        self.compile_seconds: Optional[float] = None   # how long warm_up took to compile, once it has
        self.cache = KVCache(
            n_layers=config.n_layers, max_batch=settings.max_batch, n_kv_heads=config.n_kv_heads,
            max_len=self.max_len, head_dim=config.head_dim, dtype=self.dtype, device=device)
        if stop_token_ids is None:
            # a model's own tokenizer stops on every eos id of its generation_config.json
            stop_token_ids = set(getattr(tokenizer, "stop_ids", None) or {tokenizer.eos_id})
            end_id = getattr(tokenizer, "end_id", None)
            if end_id is not None:
                stop_token_ids.add(end_id)
        self.stop_token_ids = stop_token_ids
        # the embedding table is padded beyond the tokenizer (384 rows for 263 ids): never sample there
        self.sampled_vocab = min(getattr(tokenizer, "vocab_size", config.vocab_size), config.vocab_size)
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[_Sequence] = []   # index == cache row
        self._wake = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._drain_deadline: Optional[float] = None
        self._ids = itertools.count()
        self.steps = 0
        self.failure: Optional[BaseException] = None   # the engine gave up: no restarts left
        self.restarts = 0
        self.last_error: Optional[str] = None          # the latest engine-level failure, restarted or not
        self._admitting: list[Request] = []            # taken off the queue, not yet in _running
        # called by the engine thread after every iteration of its loop (a step, or an idle wait
        # of at most 0.5 s), and between admitting new requests and the step after: gonogo/infer/
        # engine_process.py sends the events gathered so far in one message, so a newcomer's first
        # token does not wait for the next decode step of the whole batch
        self.on_iteration: Optional[Callable[[], None]] = None

    # -- lifecycle --------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Compile the decode step now (``EngineSettings.compile``; otherwise nothing to do), with
        this process's torch threads, which inductor's kernels keep: call it after choosing them.
        ``start`` calls it too; compiling here keeps it out of the first request's latency.

        Two graphs: one batch row (torch specialises a size of 1) and any other batch; the
        attended length is symbolic. They are compiled on free cache rows at position 0, which
        the next prefill overwrites (every row's length stays 0).
        """
        if self._compiled_step is None or self.compile_seconds is not None:
            return
        assert not self._running, "warm_up() while sequences are running"
        from gonogo.errors import UserError

        started = time.monotonic()
        try:
            with torch.inference_mode():
                for batch in (1, min(2, self.cache.max_batch)):
                    tokens = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
                    positions = torch.zeros(batch, dtype=torch.long, device=self.device)
                    self._compiled_step(tokens, positions, self.cache.keys, self.cache.values,
                                        attended_length(1, self.cache.max_len))
        except Exception as error:  # no C++ compiler, an inductor bug: say so, and how to serve anyway
            first_line = (str(error).strip().splitlines() or [""])[0][:300]
            raise UserError(f"--compile: torch.compile could not compile the decode step "
                            f"({type(error).__name__}: {first_line}); serve without --compile") from error
        self.compile_seconds = time.monotonic() - started
        log.info("compiled the decode step in %.1f s", self.compile_seconds)

    def start(self) -> "Engine":
        assert self._thread is None
        self.warm_up()
        self._thread = threading.Thread(target=self._supervise, name="gonogo-engine", daemon=True)
        self._thread.start()
        return self

    def drain(self, seconds: float) -> None:
        """Take no new requests; let running ones finish for up to ``seconds``, then end them."""
        with self._wake:
            self._drain_deadline = time.monotonic() + seconds
            self._wake.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """End every request (finish_reason "abort") and join the thread (bounded)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("engine thread did not stop within %.0f s", timeout)

    @property
    def accepting(self) -> bool:
        return not self._stopping and self._drain_deadline is None and self.failure is None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(serving?, details) for /health: says why not, and how often the engine was restarted."""
        self._revive()
        detail: dict[str, Any] = {"engine_restarts": self.restarts}
        if self.last_error is not None:
            detail["last_engine_error"] = self.last_error
        problem = self._not_serving()
        if problem is not None:
            detail["reason"] = str(problem)
            detail["code"] = problem.code
            return False, detail
        return True, detail

    def _not_serving(self) -> Optional[EngineStopped]:
        if self.failure is not None:
            return EngineStopped(
                f"the engine failed ({self.last_error}) and was restarted {self.restarts} times, the limit; "
                f"it serves nothing more: restart the server", code="engine_failed")
        if self._stopping or self._drain_deadline is not None:
            return EngineStopped("the server is shutting down")
        if self._thread is not None and not self._thread.is_alive():
            return EngineStopped("the engine thread is not running", code="engine_failed")
        return None

    def _revive(self) -> None:
        """A thread that ended without stopping or giving up (it should not) is started again, bounded."""
        with self._wake:
            thread = self._thread
            if thread is None or thread.is_alive() or self._stopping or self.failure is not None:
                return
            self.last_error = "the engine thread ended unexpectedly"
            log.error("%s (restart %d of at most %d)", self.last_error, self.restarts + 1, self.settings.max_restarts)
            if self.restarts >= self.settings.max_restarts:
                self.failure = RuntimeError(self.last_error)
                return
            self.restarts += 1
            self._fail_in_flight(f"the engine failed while serving this request ({self.last_error})")
            self._thread = threading.Thread(target=self._supervise, name="gonogo-engine", daemon=True)
            self._thread.start()

    @property
    def num_running(self) -> int:
        return len({id(sequence.request) for sequence in self._running})

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # -- submitting ------------------------------------------------------------------------
    def check(self, prompt_tokens: int, params: SamplingParams) -> Optional[str]:
        """Why a request cannot be served (a user's mistake), or None."""
        return check_request(self.max_len, self.settings.max_batch, prompt_tokens, params)

    def submit(self, request: Request) -> Request:
        problem = self.check(len(request.prompt_ids), request.params)
        if problem:
            raise ValueError(problem)
        self._revive()
        with self._wake:
            stopped = self._not_serving()
            if stopped is not None:
                raise stopped
            if len(self._waiting) >= self.settings.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            request.request_id = request.request_id or f"req-{next(self._ids)}"
            self._waiting.append(request)
            self._wake.notify()
        return request

    def generate(self, prompt_ids: list[int], params: SamplingParams, timeout: float = 300.0) -> list[Completion]:
        """Blocking convenience: submit, wait (bounded), return one Completion per choice."""
        events: queue.Queue[Event] = queue.Queue()
        self.submit(Request(list(prompt_ids), params, events.put))
        texts = [""] * params.n
        ids: list[list[int]] = [[] for _ in range(params.n)]
        reasons = ["" for _ in range(params.n)]
        deadline = time.monotonic() + timeout
        while True:
            event = events.get(timeout=max(0.0, deadline - time.monotonic()))
            texts[event.index] += event.text
            ids[event.index] += event.token_ids
            if event.finish_reason:
                reasons[event.index] = event.finish_reason
            if event.error is not None:
                raise RequestFailed(event.error)
            if event.done:
                break
        return [Completion(text, token_ids, reason) for text, token_ids, reason in zip(texts, ids, reasons)]

    # -- the engine thread -----------------------------------------------------------------
    def _supervise(self) -> None:
        """The thread: the loop, restarted after a failure (bounded), requests then in it failed."""
        with torch.inference_mode():
            while True:
                try:
                    self._loop()
                    self._abort_all()
                    return
                except BaseException as error:  # a bug or an out-of-memory in a batched step
                    log.exception("engine step failed")
                    self.last_error = f"{type(error).__name__}: {error}"
                    try:
                        self._fail_in_flight(f"the engine failed while serving this request ({self.last_error})")
                    except BaseException:
                        log.exception("could not recover the engine after its failure; giving up")
                        self.failure = error
                        return
                    if self.restarts >= self.settings.max_restarts:
                        log.error("engine failed %d times; giving up", self.restarts + 1)
                        self.failure = error
                        self._fail_waiting(f"the engine failed ({self.last_error}) and is not restarted again")
                        return
                    self.restarts += 1
                    log.warning("engine restarted (%d of at most %d)", self.restarts, self.settings.max_restarts)

    def _loop(self) -> None:
        while True:
            with self._wake:
                if self._stopping:
                    return
                idle = not self._running and not self._waiting
                if idle:
                    self._wake.wait(timeout=0.5)
            if not idle:
                if self._drain_deadline is not None and time.monotonic() > self._drain_deadline:
                    self._abort_all()
                self._drop_cancelled()
                if self._admit() and self.on_iteration is not None:
                    self.on_iteration()
                if self._running:
                    self._decode_step()
            if self.on_iteration is not None:
                self.on_iteration()

    def _admit(self) -> bool:
        """Every waiting request that fits into the batch, prefilled together; whether there was one."""
        batch: list[Request] = []
        rows = len(self._running)
        with self._wake:
            while self._waiting:
                request = self._waiting[0]
                if rows + request.params.n > self.settings.max_batch:
                    break
                self._waiting.popleft()
                if not request.cancelled:
                    batch.append(request)
                    rows += request.params.n
            self._admitting = list(batch)
        if not batch:
            return False
        try:
            if len(batch) > 1:
                running = len(self._running)
                try:
                    self._prefill(batch)
                    return True
                except Exception:  # whose? each request alone tells (the failed forward committed nothing)
                    log.warning("a batched prefill of %d requests failed; prefilling them one by one",
                                len(batch), exc_info=True)
                    del self._running[running:]
                    self._reset_free_rows()
            for request in batch:
                try:
                    self._prefill([request])
                except Exception as error:  # this request's prompt or sampling: it alone fails
                    self._fail_request(request, error)
        finally:
            self._admitting = []
        return True

    def _prefill(self, requests: list[Request]) -> None:
        """Run the prompts in one forward (right-padded), share each prompt's cache with its other
        choices, sample each choice's first token. A failure in sampling fails that request alone."""
        first_row = len(self._running)
        lengths = [len(request.prompt_ids) for request in requests]
        T = max(lengths)
        prompts = torch.zeros((len(requests), T), dtype=torch.long)
        for row, request in enumerate(requests):
            prompts[row, :lengths[row]] = torch.tensor(request.prompt_ids, dtype=torch.long)
        prompts = prompts.to(self.device)
        for row in range(first_row, first_row + len(requests)):
            self.cache.reset_row(row)
        self.cache.begin(first_row, len(requests), T)
        last_index = torch.tensor(lengths, device=self.device) - 1
        logits = self._forward_last(prompts, torch.arange(T, device=self.device).expand(len(requests), T),
                                    last_index)
        self.cache.commit(lengths)
        last = logits[:, :self.sampled_vocab].float().cpu()
        # the prompts' rows first (row == index in _running), then the other choices' rows
        groups = [[self._sequence(request, 0)] for request in requests]
        self._running.extend(group[0] for group in groups)
        for row, (request, group) in enumerate(zip(requests, groups)):
            extra = list(range(len(self._running), len(self._running) + request.params.n - 1))
            self.cache.copy_row(first_row + row, extra)
            group += [self._sequence(request, index) for index in range(1, request.params.n)]
            self._running.extend(group[1:])
        for row, (request, group) in enumerate(zip(requests, groups)):
            try:
                for sequence in group:
                    if request.error is None:
                        self._accept(sequence, sample_next(last[row], request.params, sequence.generator))
            except Exception as error:  # this request's sampling or text: it alone fails
                self._fail_request(request, error)

    def _sequence(self, request: Request, index: int) -> _Sequence:
        seed = None if request.params.seed is None else request.params.seed + index
        return _Sequence(request, index, make_generator(seed), TextTracker(self.tokenizer.decode, request.params.stop))

    def _forward_last(self, tokens: torch.Tensor, positions: torch.Tensor,
                      last_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, vocab] of each row's position ``last_index`` (default: the last)."""
        if isinstance(self.forward, FastDecoder):
            return self.forward(tokens, positions=positions, cache=self.cache, last_index=last_index)[:, -1]
        logits = self.forward(tokens, positions=positions, cache=self.cache)
        if last_index is None:
            return logits[:, -1]
        return logits[torch.arange(tokens.shape[0], device=logits.device), last_index]

    def _reset_free_rows(self) -> None:
        self.cache.abandon()
        for row in range(len(self._running), self.cache.max_batch):
            self.cache.reset_row(row)

    def _decode_step(self) -> None:
        B = len(self._running)
        tokens = torch.tensor([[sequence.next_token] for sequence in self._running], dtype=torch.long,
                              device=self.device)
        if self._compiled_step is not None:
            lengths = self.cache.lengths[:B]
            attended = attended_length(int(lengths.max()) + 1, self.cache.max_len)
            logits = self._compiled_step(tokens, lengths.to(self.device), self.cache.keys, self.cache.values,
                                         attended)
            self.cache.advance(B)
        else:
            positions = self.cache.lengths[:B, None].to(self.device)
            self.cache.begin(0, B, 1)
            logits = self._forward_last(tokens, positions)
            self.cache.commit()
        self.steps += 1
        last = logits[:, :self.sampled_vocab].float().cpu()
        running = list(self._running)
        # greedy rows with finite logits: one argmax for the whole batch; the others sample alone
        finite = torch.isfinite(last).all(dim=-1)
        greedy: list[int] = last.argmax(dim=-1).tolist()
        if all(sequence.request.params.greedy for sequence in running) and bool(finite.all()):
            chosen: list[Optional[int]] = list(greedy)
        else:
            finite_rows = finite.tolist()
            chosen = []
            for row, sequence in enumerate(running):
                if sequence.request.params.greedy and finite_rows[row]:
                    chosen.append(greedy[row])
                    continue
                try:
                    chosen.append(sample_next(last[row], sequence.request.params, sequence.generator))
                except Exception as error:  # this row's numbers: its request alone fails
                    chosen.append(None)
                    self._fail_request(sequence.request, error)
        for sequence, token in zip(running, chosen):
            if token is None or sequence.request.error is not None:
                continue
            try:
                self._accept(sequence, token)
            except Exception as error:  # decoding this request's text
                self._fail_request(sequence.request, error)

    def _accept(self, sequence: _Sequence, token: int) -> None:
        """Record a sampled token: emit its text, and finish the sequence when it is done."""
        params = sequence.request.params
        sequence.generated += 1
        sequence.request.completion_tokens += 1
        finish: Optional[str] = None
        if token in self.stop_token_ids and not params.ignore_eos:
            finish = "stop"
            text = ""
            token_ids: list[int] = []
        else:
            text = sequence.tracker.add(token)
            token_ids = [token]
            if sequence.tracker.stopped:
                finish = "stop"
            elif sequence.generated >= params.max_tokens:
                finish = "length"
            elif len(sequence.request.prompt_ids) + sequence.generated >= self.max_len:
                finish = "length"
        if finish:
            text += sequence.tracker.flush()
            self._finish(sequence, finish, text, token_ids)
        else:
            sequence.next_token = token
            if text or token_ids:
                sequence.request.emit(Event(sequence.index, text, token_ids))

    def _finish(self, sequence: _Sequence, reason: str, text: str = "", token_ids: Optional[list[int]] = None) -> None:
        request = sequence.request
        request.finished_choices += 1
        done = request.finished_choices == request.params.n
        self._remove(sequence)
        request.emit(Event(sequence.index, text, token_ids or [], reason, done=done,
                           prompt_tokens=len(request.prompt_ids), completion_tokens=request.completion_tokens))

    def _remove(self, sequence: _Sequence) -> None:
        """Take a sequence out of the batch, keeping the cache rows contiguous."""
        row = self._running.index(sequence)
        last = len(self._running) - 1
        self.cache.move_row(last, row)
        self._running[row] = self._running[last]
        self._running.pop()
        self.cache.reset_row(last)

    def _fail_request(self, request: Request, error: BaseException) -> None:
        """End one request with an error event; the rest of the batch carries on."""
        log.error("request %s failed in the engine: %s: %s", request.request_id, type(error).__name__, error,
                  exc_info=error)
        self.cache.abandon()  # a forward that raised between begin() and commit()
        for sequence in [s for s in self._running if s.request is request]:
            self._remove(sequence)
        for row in range(len(self._running), self.cache.max_batch):  # rows a failed prefill filled
            self.cache.reset_row(row)
        self._emit_error(request, f"generation failed: {type(error).__name__}: {error}")

    def _emit_error(self, request: Request, message: str) -> None:
        if request.error is not None or request.finished_choices >= request.params.n:
            return  # already answered
        request.error = message
        request.finished_choices = request.params.n
        request.emit(Event(0, "", [], "error", done=True, prompt_tokens=len(request.prompt_ids),
                           completion_tokens=request.completion_tokens, error=message))

    def _fail_in_flight(self, message: str) -> None:
        """After an engine-level failure: every request in the batch (or being admitted) fails."""
        requests = [sequence.request for sequence in self._running] + self._admitting
        self._admitting = []
        self._running.clear()
        self.cache.abandon()
        for row in range(self.cache.max_batch):
            self.cache.reset_row(row)
        for request in {id(request): request for request in requests}.values():  # once each, in order
            try:
                self._emit_error(request, message)
            except Exception:  # an emit callback that raises must not stop the others' answers
                log.exception("could not tell request %s that it failed", request.request_id)

    def _fail_waiting(self, message: str) -> None:
        with self._wake:
            waiting = list(self._waiting)
            self._waiting.clear()
        for request in waiting:
            self._emit_error(request, message)

    def _drop_cancelled(self) -> None:
        for sequence in [s for s in self._running if s.request.cancelled]:
            self._finish(sequence, "abort")

    def _abort_all(self) -> None:
        for sequence in list(self._running):
            self._finish(sequence, "abort", sequence.tracker.flush())
        with self._wake:
            waiting = list(self._waiting)
            self._waiting.clear()
        for request in waiting:
            for index in range(request.params.n):
                request.finished_choices += 1
                request.emit(Event(index, "", [], "abort", done=request.finished_choices == request.params.n,
                                   prompt_tokens=len(request.prompt_ids)))


def check_request(max_len: int, max_batch: int, prompt_tokens: int, params: SamplingParams) -> Optional[str]:
    """Why a request cannot be served by an engine of this context and batch (a user's mistake), or None."""
    if prompt_tokens < 1:
        return "the prompt is empty"
    if prompt_tokens + params.max_tokens > max_len:
        return (f"prompt ({prompt_tokens} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"model's context of {max_len} tokens; shorten the prompt or lower max_tokens")
    if params.n > max_batch:
        return f"n={params.n} exceeds the engine's batch of {max_batch}"
    return params.problem()


def load_engine(checkpoint: str | Path, settings: EngineSettings | None = None) -> Engine:
    """An engine (not yet started) for a gonogo checkpoint, run directory or HF export."""
    from gonogo.data.hf_tokenizer import load_tokenizer
    from gonogo.checkpoints import resolve
    from gonogo.infer.device import load_for_inference

    model, _config, meta = load_for_inference(resolve(checkpoint))  # verified once, here
    return Engine(model, load_tokenizer(meta), settings)
