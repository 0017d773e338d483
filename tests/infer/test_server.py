"""The real openai client against a real `gonogo serve` process on 127.0.0.1."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from .conftest import API_KEY, REPO_ROOT, start_server

MESSAGES = [{"role": "user", "content": "12+34="}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list()] == ["gonogo"]


def test_streamed_chat_equals_non_streamed_greedy_chat(client):
    plain = client.chat.completions.create(model="gonogo", messages=MESSAGES, max_tokens=40, temperature=0)
    text = plain.choices[0].message.content
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
    assert plain.choices[0].finish_reason in ("stop", "length") and text
    assert plain.usage.completion_tokens >= 1 and plain.usage.prompt_tokens > 0
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="gonogo", messages=MESSAGES, max_tokens=40, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completions_streamed_and_not(client):
    plain = client.completions.create(model="gonogo", prompt="Q: 47+385= A:", max_tokens=12, temperature=0)
    assert plain.object == "text_completion" and plain.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 12
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="gonogo", prompt="Q: 47+385= A:", max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == plain.choices[0].text


def test_n_choices_with_seed(client):
    first = client.chat.completions.create(model="gonogo", messages=MESSAGES, max_tokens=10, n=3, seed=5,
                                           temperature=1.0)
    again = client.chat.completions.create(model="gonogo", messages=MESSAGES, max_tokens=10, n=3, seed=5,
                                           temperature=1.0)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]


def test_raw_sse_format(server):
    body = {"model": "gonogo", "messages": MESSAGES, "max_tokens": 5, "stream": True}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ") and json.loads(event[6:])["object"] == "chat.completion.chunk"


BAD_REQUESTS = [
    ("bad json", b"{not json", 400),
    ("not an object", b"[1, 2]", 400),
    ("wrong type", {"model": "gonogo", "messages": MESSAGES, "max_tokens": "ten"}, 400),
    ("negative max_tokens", {"model": "gonogo", "messages": MESSAGES, "max_tokens": -5}, 400),
    ("huge max_tokens", {"model": "gonogo", "messages": MESSAGES, "max_tokens": 10**9}, 400),
    ("empty messages", {"model": "gonogo", "messages": []}, 400),
    ("bad role", {"model": "gonogo", "messages": [{"role": "robot", "content": "x"}]}, 400),
    ("missing model", {"messages": MESSAGES}, 400),
    ("unknown model", {"model": "gpt-9", "messages": MESSAGES}, 404),
    ("n too large", {"model": "gonogo", "messages": MESSAGES, "n": 1000}, 400),
    ("temperature out of range", {"model": "gonogo", "messages": MESSAGES, "temperature": 9}, 400),
    ("oversized body", {"model": "gonogo", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}, 413),
]


@pytest.mark.parametrize("name,body,status", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_malformed_requests_get_a_4xx_with_an_openai_error_body(server, name, body, status):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server.url}/v1/chat/completions", content=content, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "Basic " + API_KEY])
def test_missing_or_wrong_key_is_401(server, header):
    headers = {"Authorization": header} if header else {}
    response = httpx.post(f"{server.url}/v1/completions", json={"model": "gonogo", "prompt": "a"},
                          headers=headers, timeout=30)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_openai_client_sees_a_typed_error(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="gonogo", prompt="hi", max_tokens=0)


def test_metrics_are_prometheus_text(server, client):
    client.completions.create(model="gonogo", prompt="hello", max_tokens=3)
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for name in ("gonogo_requests_total", "gonogo_time_to_first_token_seconds_bucket",
                 "gonogo_inter_token_latency_seconds_bucket", "gonogo_e2e_request_latency_seconds_count",
                 "gonogo_num_requests_running", "gonogo_num_requests_waiting",
                 "gonogo_prompt_tokens_total", "gonogo_generation_tokens_total"):
        assert name in text
    assert 'gonogo_requests_total{route="/v1/completions",status="200"}' in text


def test_refuses_to_bind_beyond_loopback_without_a_key(checkpoint_dir):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-m", "gonogo", "serve", "--checkpoint", str(checkpoint_dir),
                             "--host", "0.0.0.0", "--port", "0"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "--api-key-env" in result.stderr


@pytest.mark.parametrize("to_group", [False, True], ids=["server", "process-group"])
def test_sigterm_ends_in_flight_streams_cleanly(checkpoint_dir, tmp_path, to_group):
    """A SIGTERM to the server, or to its whole process group (as a plan stops it), drains: the
    stream ends with a finish reason, not an error from an engine process stopped under it."""
    server = start_server(checkpoint_dir, tmp_path)
    lines: list[str] = []
    first_chunk = threading.Event()

    def stream():
        body = {"model": "gonogo", "prompt": "Q: 1+1= A:", "max_tokens": 240, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"}) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    first_chunk.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert first_chunk.wait(30)  # the stream is running (240 tokens of this model take ~0.3 s)
    started = time.monotonic()
    if to_group:
        os.killpg(server.process.pid, signal.SIGTERM)
    else:
        server.process.send_signal(signal.SIGTERM)
    thread.join(timeout=40)
    code = server.stop(grace=30)
    assert not thread.is_alive()
    assert lines and lines[-1] == "data: [DONE]"
    # drained in full: not an error, nor an abort of a request the engine had time to finish
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length", lines[-2]
    assert code in (0, 130, -signal.SIGTERM) and time.monotonic() - started < 30  # 130: the CLI maps SIGTERM to an interrupt


@pytest.mark.parametrize("engine_process", [True, False], ids=["engine-process", "one-process"])
def test_a_full_queue_answers_429_and_the_server_recovers(checkpoint_dir, tmp_path, engine_process):
    server = start_server(checkpoint_dir, tmp_path, max_batch=1, max_waiting=1, engine_process=engine_process)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "gonogo", "prompt": "Q: 5+5= A:", "max_tokens": 200, "ignore_eos": True}

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(8)))

    try:
        # 8 at once, one batch slot and one queue place: at most 2 are taken, the rest are refused.
        # The engine process's parent counts every request in flight: exactly 2; in one process the
        # engine thread may have admitted the first before the others are queued
        statuses = [response.status_code for response in asyncio.run(burst())]
        if engine_process:
            assert statuses.count(200) == 2 and statuses.count(429) == 6, statuses
        else:
            assert 1 <= statuses.count(200) <= 3 and statuses.count(429) >= 5, statuses
        refused = next(r for r in asyncio.run(burst()) if r.status_code == 429)
        assert refused.json()["error"]["code"] == "queue_full"
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        assert httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 3}, headers=headers,
                          timeout=60).status_code == 200
    finally:
        server.stop()
