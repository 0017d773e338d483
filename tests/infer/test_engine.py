"""Continuous batching: batched output equals alone, requests join mid-decode, choices, stops."""

import queue
import threading
import time

import pytest
import torch

from gonogo.data.tokenizer import ByteTokenizer
from gonogo.infer import engine as engine_module
from gonogo.infer.engine import Engine, EngineSettings, EngineStopped, QueueFull, Request, RequestFailed
from gonogo.infer.sampling import SamplingParams

from .conftest import tiny_model

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module", params=[False, True], ids=["eager", "compiled"])
def engine(request, tmp_path_factory):
    """The engine as it serves by default, and with its decode step compiled (``serve --compile``):
    every test of exactness below holds for both."""
    with pytest.MonkeyPatch.context() as patch:
        # its own inductor cache: nothing half-written by an interrupted compile elsewhere is loaded
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
        engine = Engine(tiny_model(), ByteTokenizer(), EngineSettings(max_batch=8, compile=request.param)).start()
        assert (engine.compile_seconds is not None) == request.param   # compiled at start, not on a request
        yield engine
        engine.stop()


def reference_greedy(model, prompt, count, stop_ids):
    """Greedy decoding with full forwards and no cache: what the engine must reproduce."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(count):
            token = int(model(torch.tensor([ids]))[0, -1, :ByteTokenizer().vocab_size].argmax())
            if token in stop_ids:
                break
            out.append(token)
            ids.append(token)
    return out


def prompts(count):
    tokenizer = ByteTokenizer()
    return [tokenizer.encode(f"Q: {i * 37}+{i * 11 + 5}= A:") for i in range(count)]


def test_greedy_equals_uncached_reference(engine):
    prompt = prompts(1)[0]
    result = engine.generate(prompt, SamplingParams(max_tokens=24, **GREEDY))[0]
    assert result.token_ids == reference_greedy(engine.model, prompt, 24, engine.stop_token_ids)
    assert len(result.token_ids) > 5 and len(set(result.token_ids)) > 3  # a varied, non-trivial output


def test_greedy_output_is_the_same_alone_and_batched(engine):
    params = [SamplingParams(max_tokens=12 + 3 * i, **GREEDY) for i in range(6)]
    alone = [engine.generate(p, s)[0].token_ids for p, s in zip(prompts(6), params)]
    batched = [None] * 6

    def run(index):
        batched[index] = engine.generate(prompts(6)[index], params[index])[0].token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert batched == alone


def test_a_request_joining_mid_decode_is_served_and_both_stay_exact(engine):
    first_prompt, second_prompt = prompts(2)
    long_params = SamplingParams(max_tokens=120, **GREEDY)
    short_params = SamplingParams(max_tokens=10, **GREEDY)
    first_alone = engine.generate(first_prompt, long_params)[0].token_ids
    second_alone = engine.generate(second_prompt, short_params)[0].token_ids

    first_events: queue.Queue = queue.Queue()
    engine.submit(Request(first_prompt, long_params, first_events.put))
    first_tokens = []
    while len(first_tokens) < 5:  # the first request is decoding
        first_tokens += first_events.get(timeout=30).token_ids
    second = engine.generate(second_prompt, short_params)[0]
    joined_at = len(first_tokens)
    while True:
        event = first_events.get(timeout=60)
        first_tokens += event.token_ids
        if event.done:
            break
    assert second.token_ids == second_alone
    assert first_tokens == first_alone
    assert joined_at < len(first_alone)  # it really joined while the first was running


def test_seeded_sampling_is_reproducible_and_choices_differ(engine):
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=7, n=3)
    once = [c.token_ids for c in engine.generate(prompts(1)[0], params)]
    again = [c.token_ids for c in engine.generate(prompts(1)[0], params)]
    assert once == again
    assert len({tuple(ids) for ids in once}) > 1


def test_stop_string_ends_with_stop_and_is_not_in_the_text(engine):
    prompt = prompts(1)[0]
    free = engine.generate(prompt, SamplingParams(max_tokens=30, **GREEDY))[0]
    assert free.finish_reason == "length"
    text = free.text
    at = next(i for i in range(3, len(text)) if text[i] not in text[:i] and text[i] != "\ufffd")
    stop = text[at]
    stopped = engine.generate(prompt, SamplingParams(max_tokens=30, stop=[stop], **GREEDY))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[:free.text.index(stop)]


def test_context_limit_is_a_clear_error(engine):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        engine.submit(Request([1] * 200, SamplingParams(max_tokens=100), lambda event: None))


def test_queue_limit_refuses_with_queue_full():
    engine = Engine(tiny_model(), ByteTokenizer(), EngineSettings(max_batch=1, max_waiting=1))  # not started
    engine.submit(Request([65, 66], SamplingParams(max_tokens=4), lambda event: None))
    with pytest.raises(QueueFull):
        engine.submit(Request([65, 66], SamplingParams(max_tokens=4), lambda event: None))


def test_moe_model_and_bfloat16_setting_generate():
    moe = Engine(tiny_model(moe=True), ByteTokenizer(), EngineSettings(max_batch=4)).start()
    try:
        results = moe.generate(prompts(1)[0], SamplingParams(max_tokens=8, n=2, **GREEDY))
        assert [len(r.token_ids) for r in results] == [8, 8] and results[0].token_ids == results[1].token_ids
    finally:
        moe.stop()
    half = Engine(tiny_model(), ByteTokenizer(), EngineSettings(max_batch=4, dtype="bfloat16")).start()
    try:
        assert half.cache.keys[0].dtype == torch.bfloat16
        assert len(half.generate(prompts(1)[0], SamplingParams(max_tokens=8, **GREEDY))[0].token_ids) == 8
    finally:
        half.stop()


def test_stop_ends_running_requests_with_abort():
    engine = Engine(tiny_model(), ByteTokenizer(), EngineSettings(max_batch=2)).start()
    events: queue.Queue = queue.Queue()
    engine.submit(Request(prompts(1)[0], SamplingParams(max_tokens=200, **GREEDY), events.put))
    events.get(timeout=30)
    engine.stop()
    last = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        last = events.get(timeout=10)
        if last.done:
            break
    assert last.done and last.finish_reason in ("abort", "length")


def test_end_of_sequence_stops_unless_ignore_eos():
    engine = Engine(tiny_model(), ByteTokenizer(), EngineSettings(max_batch=2)).start()
    try:
        prompt = prompts(1)[0]
        free = engine.generate(prompt, SamplingParams(max_tokens=10, ignore_eos=True, **GREEDY))[0].token_ids
        engine.stop_token_ids = {free[3]}  # pretend the 4th token is the end-of-sequence token
        stopped = engine.generate(prompt, SamplingParams(max_tokens=10, **GREEDY))[0]
        assert stopped.finish_reason == "stop" and stopped.token_ids == free[:free.index(free[3])]
        ignored = engine.generate(prompt, SamplingParams(max_tokens=10, ignore_eos=True, **GREEDY))[0]
        assert ignored.finish_reason == "length" and ignored.token_ids == free
    finally:
        engine.stop()


def rigged_sampling(monkeypatch, fail_on_call: int):
    """Sampling that raises on a chosen call for requests marked with top_k=7, as a numerical bug would."""
    real = engine_module.sample_next
    calls = [0]

    def sample(logits, params, generator):
        if params.top_k == 7:
            calls[0] += 1
            if calls[0] == fail_on_call:
                raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, params, generator)

    monkeypatch.setattr(engine_module, "sample_next", sample)


@pytest.mark.parametrize("fail_on_call", [1, 4], ids=["in the prefill", "in a decode step"])
def test_a_request_failing_in_sampling_fails_alone_and_the_batch_carries_on(engine, monkeypatch, fail_on_call):
    healthy_prompt, bad_prompt = prompts(2)
    healthy_params = SamplingParams(max_tokens=40, **GREEDY)
    healthy_alone = engine.generate(healthy_prompt, healthy_params)[0].token_ids
    rigged_sampling(monkeypatch, fail_on_call)

    healthy_events: queue.Queue = queue.Queue()
    engine.submit(Request(healthy_prompt, healthy_params, healthy_events.put))
    tokens = []
    while len(tokens) < 3:  # the healthy request is decoding when the bad one joins
        tokens += healthy_events.get(timeout=30).token_ids
    with pytest.raises(RequestFailed, match="generation failed: RuntimeError: probability tensor"):
        engine.generate(bad_prompt, SamplingParams(max_tokens=20, temperature=1.0, top_k=7, n=2, seed=1))
    while True:
        event = healthy_events.get(timeout=60)
        tokens += event.token_ids
        if event.done:
            break
    assert event.error is None and event.finish_reason == "length" and tokens == healthy_alone
    assert engine.restarts == 0 and engine.health()[0]
    assert engine.generate(bad_prompt, SamplingParams(max_tokens=5, **GREEDY))[0].finish_reason == "length"


def test_sampling_parameters_the_numerics_cannot_take_are_refused_before_the_engine_thread():
    engine = Engine(tiny_model(), ByteTokenizer(), EngineSettings(max_batch=2))  # not started: nothing may run
    for params in (SamplingParams(seed=1 << 64), SamplingParams(seed=-(1 << 63) - 1),
                   SamplingParams(seed=(1 << 64) - 1, n=2), SamplingParams(temperature=float("nan")),
                   SamplingParams(top_p=0.0), SamplingParams(temperature=float("inf"))):
        with pytest.raises(ValueError):
            engine.submit(Request([65, 66], params, lambda event: None))
    assert engine.num_waiting == 0


def test_the_engine_restarts_after_a_failed_step_and_gives_up_after_its_limit(monkeypatch):
    from fastapi.testclient import TestClient

    from gonogo.infer.server import create_app

    engine = Engine(tiny_model(), ByteTokenizer(), EngineSettings(max_batch=2, max_restarts=1))
    failures = [1]   # the next decode steps that raise
    real_step = engine._decode_step

    def step():
        if failures[0] > 0:
            failures[0] -= 1
            raise RuntimeError("CUDA error: an illegal memory access")  # not any one request's fault
        real_step()

    monkeypatch.setattr(engine, "_decode_step", step)
    engine.start()
    http = TestClient(create_app(engine, model_name="gonogo"))
    try:
        params = SamplingParams(max_tokens=8, **GREEDY)
        with pytest.raises(RequestFailed, match="the engine failed while serving this request .*illegal memory"):
            engine.generate(prompts(1)[0], params, timeout=30)
        assert engine.generate(prompts(1)[0], params, timeout=30)[0].finish_reason == "length"  # restarted
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["engine_restarts"] == 1
        assert "illegal memory access" in health.json()["last_engine_error"]

        failures[0] = 1  # the second failure is beyond max_restarts=1: the engine stops, and says so
        with pytest.raises(RequestFailed):
            engine.generate(prompts(1)[0], params, timeout=30)
        deadline = time.monotonic() + 10
        while engine.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["code"] == "engine_failed"
        assert "restarted 1 times" in health.json()["reason"]
        with pytest.raises(EngineStopped, match="the engine failed .*restart the server"):
            engine.submit(Request(prompts(1)[0], params, lambda event: None))
        refused = http.post("/v1/completions", json={"model": "gonogo", "prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_failed"
        assert "shutting down" not in refused.json()["error"]["message"]
    finally:
        engine.stop()


def test_an_engine_thread_that_ends_unexpectedly_is_started_again_and_health_says_so(monkeypatch):
    engine = Engine(tiny_model(), ByteTokenizer(), EngineSettings(max_batch=2, max_restarts=1))
    real_supervise = engine._supervise
    monkeypatch.setattr(engine, "_supervise", lambda: None)  # a thread that just ends, as if killed
    engine.start()
    engine._thread.join(timeout=10)
    monkeypatch.setattr(engine, "_supervise", real_supervise)
    try:
        serving, detail = engine.health()  # notices, restarts it, and says so
        assert serving and detail["engine_restarts"] == 1
        assert detail["last_engine_error"] == "the engine thread ended unexpectedly"
        params = SamplingParams(max_tokens=4, **GREEDY)
        assert engine.generate(prompts(1)[0], params, timeout=30)[0].finish_reason == "length"

        monkeypatch.setattr(engine, "_supervise", lambda: None)
        engine._stopping = True   # end the running thread, then pretend it ended on its own again
        engine._thread.join(timeout=10)
        engine._stopping = False
        engine._thread = threading.Thread(target=lambda: None)
        engine._thread.start()
        engine._thread.join(timeout=10)
        serving, detail = engine.health()  # beyond max_restarts: not restarted, and said so
        assert not serving and detail["code"] == "engine_failed" and "restart the server" in detail["reason"]
        with pytest.raises(EngineStopped):
            engine.submit(Request(prompts(1)[0], params, lambda event: None))
    finally:
        engine.stop()


def test_a_newcomers_first_token_is_handed_on_before_the_next_decode_step():
    """``on_iteration`` runs between admitting and the next step: the engine process sends a new
    request's first token then, not after one more decode step of the whole batch (its TTFT)."""
    engine = Engine(tiny_model(), ByteTokenizer(), EngineSettings(max_batch=2))
    events: list = []
    seen: list[tuple[int, int]] = []   # (decode steps so far, events so far) at each call
    engine.on_iteration = lambda: seen.append((engine.steps, len(events)))
    engine.start()
    try:
        done = threading.Event()

        def emit(event) -> None:
            events.append(event)
            if event.done:
                done.set()

        engine.submit(Request([65, 66, 67], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), emit))
        assert done.wait(60)
    finally:
        engine.stop()
    first_with_a_token = next((steps, count) for steps, count in seen if count > 0)
    assert first_with_a_token == (0, 1), seen


def test_compile_refuses_what_it_cannot_compile_and_says_why_a_compile_failed(monkeypatch):
    from gonogo.errors import UserError

    with pytest.raises(UserError, match="--compile supports dense models only"):
        Engine(tiny_model(moe=True), ByteTokenizer(), EngineSettings(compile=True))
    with pytest.raises(UserError, match="the fused forward is off.*without --compile"):
        Engine(tiny_model(), ByteTokenizer(), EngineSettings(compile=True, fused=False))

    def no_compiler(function, **options):  # a machine without a C++ compiler fails at the first call
        def call(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return call

    monkeypatch.setattr(engine_module.torch, "compile", no_compiler)
    engine = Engine(tiny_model(), ByteTokenizer(), EngineSettings(compile=True))
    with pytest.raises(UserError, match="could not compile the decode step .*InvalidCxxCompiler.*without --compile"):
        engine.warm_up()
