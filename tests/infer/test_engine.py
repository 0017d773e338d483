"""Continuous batching: batched output equals alone, requests join mid-decode, choices, stops."""

import queue
import threading
import time

import pytest
import torch

from gonogo.data.tokenizer import ByteTokenizer
from gonogo.infer.engine import Engine, EngineSettings, QueueFull, Request
from gonogo.infer.sampling import SamplingParams

from .conftest import tiny_model

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def engine():
    engine = Engine(tiny_model(), ByteTokenizer(), EngineSettings(max_batch=8)).start()
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
