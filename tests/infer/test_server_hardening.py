"""Hostile and careless requests against a real `gonogo serve` on 127.0.0.1: never a 5xx.

Each request that once broke the server (killed the engine thread, or answered a plain-text 500)
is sent, and the next normal request, made with the real openai client, must still succeed and
/health stay 200. A property-based fuzz (schemathesis, driven by the server's own /openapi.json)
then sends schema-valid and schema-invalid requests to every route.
"""

import json
import socket
import time

import httpx
import openai
import pytest

from .conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
JSON = {**AUTH, "Content-Type": "application/json"}
MESSAGES = [{"role": "user", "content": "12+34="}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def assert_still_serving(server, client) -> None:
    """The server took the last request in its stride: a normal one succeeds, /health is 200."""
    answer = client.completions.create(model="gonogo", prompt="Q: 2+2= A:", max_tokens=2, temperature=0)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 2
    health = httpx.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["engine_restarts"] == 0, health.text


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def completion(**fields):
    return {"model": "gonogo", "prompt": "Q: 1+1= A:", "max_tokens": 4, **fields}


def chat(**fields):
    return {"model": "gonogo", "messages": MESSAGES, "max_tokens": 4, **fields}


# (name, route, body: dict or raw bytes, status, the error's param or None)
HOSTILE = [
    ("seed above 64 bits", "completions", completion(seed=18446744073709551616), 400, "seed"),
    ("seed below 64 bits", "completions", completion(seed=-9223372036854775809), 400, "seed"),
    ("seed + n - 1 overflows", "completions", completion(seed=18446744073709551615, n=2), 400, "seed"),
    ("chat seed overflow", "chat/completions", chat(seed=18446744073709551615, n=2), 400, "seed"),
    ("100k-deep JSON", "chat/completions", b"[" * 100_000 + b"]" * 100_000, 400, None),
    ("100k-deep JSON in a field", "completions",
     b'{"model": "gonogo", "prompt": "a", "user": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
    ("4301-digit integer", "completions", b'{"model": "gonogo", "prompt": "a", "seed": ' + b"7" * 4301 + b"}",
     400, None),
    ("NaN", "completions", b'{"model": "gonogo", "prompt": "a", "temperature": NaN}', 400, None),
    ("1e999", "completions", b'{"model": "gonogo", "prompt": "a", "top_p": 1e999}', 400, None),
    ("lone surrogate in a prompt", "completions", b'{"model": "gonogo", "prompt": "ab\\ud800c"}', 400, "prompt"),
    ("lone surrogate in a message", "chat/completions",
     b'{"model": "gonogo", "messages": [{"role": "user", "content": "\\udfff"}]}', 400, "messages.0.content"),
    ("lone surrogate in a stop", "completions", b'{"model": "gonogo", "prompt": "a", "stop": ["\\ud800"]}',
     400, "stop.0"),
    ("encoded surrogate bytes", "completions", b'{"model": "gonogo", "prompt": "\xed\xa0\x80"}', 400, None),
    ("not UTF-8", "completions", b'{"model": "gonogo", "prompt": "\xff"}', 400, None),
    ("echo", "completions", completion(echo=True), 400, "echo"),
    ("suffix", "completions", completion(suffix="!"), 400, "suffix"),
    ("best_of", "completions", completion(best_of=3), 400, "best_of"),
    ("completion logprobs", "completions", completion(logprobs=1), 400, "logprobs"),
    ("chat logprobs", "chat/completions", chat(logprobs=True, top_logprobs=2), 400, "logprobs"),
    ("tools", "chat/completions", chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    ("response_format", "chat/completions", chat(response_format={"type": "json_object"}), 400, "response_format"),
    ("logit_bias", "chat/completions", chat(logit_bias={"65": 100}), 400, "logit_bias"),
    ("vLLM min_tokens", "completions", completion(min_tokens=3), 400, "min_tokens"),
    ("assistant tool calls", "chat/completions",
     chat(messages=[{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]), 400, None),
    ("negative top_k", "completions", completion(top_k=-5), 400, "top_k"),
    ("zero top_p", "completions", completion(top_p=0), 400, "top_p"),
]


@pytest.mark.parametrize("name,route,body,status,param", HOSTILE, ids=[case[0] for case in HOSTILE])
def test_hostile_requests_get_a_4xx_and_the_server_carries_on(server, client, name, route, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server.url}/v1/{route}", content=content, headers=JSON, timeout=60)
    error = assert_openai_error(response, status)
    if param is not None:
        assert error["param"] == param, error
    assert_still_serving(server, client)


# the random-weight model may sample its end token early at the default temperature: the count of 3 checks
# that the request was served in full, so it asks for exactly max_tokens (vLLM's extension field)
FULL_LENGTH = {"ignore_eos": True}


def test_meaning_changing_fields_at_their_off_value_are_accepted(client):
    answer = client.completions.create(model="gonogo", prompt="Q: 1+1= A:", max_tokens=3, echo=False, best_of=1,
                                       logprobs=None, suffix=None, presence_penalty=0, extra_body=FULL_LENGTH)
    assert answer.usage.completion_tokens == 3
    answer = client.chat.completions.create(model="gonogo", messages=MESSAGES, max_tokens=3,
                                            response_format={"type": "text"}, tool_choice="none", logprobs=False,
                                            extra_body=FULL_LENGTH)
    assert answer.usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="gonogo", messages=MESSAGES, max_tokens=3, tools=[
            {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}])


def test_tiny_temperature_and_top_p_answer_as_greedy(server, client):
    """Near zero, both mean "the top token": answered exactly so, never a NaN or an empty distribution."""
    greedy = client.completions.create(model="gonogo", prompt="Q: 47+385= A:", max_tokens=12, temperature=0)
    for extreme in ({"top_p": 1e-300}, {"temperature": 1e-40}, {"temperature": 5e-324}):
        answer = client.completions.create(model="gonogo", prompt="Q: 47+385= A:", max_tokens=12, seed=3, **extreme)
        assert answer.choices[0].text == greedy.choices[0].text, extreme
        assert_still_serving(server, client)


def test_json_content_type_is_required(server, client):
    body = json.dumps(completion()).encode()
    for headers in ({**AUTH, "Content-Type": "text/plain"}, {**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
                    AUTH):
        error = assert_openai_error(httpx.post(f"{server.url}/v1/completions", content=body, headers=headers,
                                               timeout=30), 415)
        assert "Content-Type: application/json" in error["message"]
    charset = {**AUTH, "Content-Type": "application/json; charset=utf-8"}
    assert httpx.post(f"{server.url}/v1/completions", content=body, headers=charset, timeout=60).status_code == 200
    assert_still_serving(server, client)


def test_wrong_method_is_405_with_allow(server, client):
    for method, path, allowed in (("POST", "/health", "GET"), ("GET", "/v1/completions", "POST"),
                                  ("DELETE", "/v1/chat/completions", "POST"), ("PUT", "/v1/models", "GET")):
        response = httpx.request(method, f"{server.url}{path}", headers=AUTH, timeout=10)
        assert_openai_error(response, 405)
        assert allowed in [method.strip() for method in response.headers["allow"].split(",")]
    assert_openai_error(httpx.get(f"{server.url}/v1/no/such/route", headers=AUTH, timeout=10), 404)
    assert_still_serving(server, client)


def test_models_by_id(server, client):
    assert client.models.retrieve("gonogo").id == "gonogo"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    error = assert_openai_error(httpx.get(f"{server.url}/v1/models/org/gpt-9", headers=AUTH, timeout=10), 404)
    assert error["code"] == "model_not_found" and "gpt-9" in error["message"]
    assert_openai_error(httpx.get(f"{server.url}/v1/models/gonogo", timeout=10), 401)
    assert_still_serving(server, client)


def test_openapi_describes_what_the_server_accepts(server):
    response = httpx.get(f"{server.url}/openapi.json", timeout=10)
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/{model_id}",
            "/health", "/metrics"} <= set(document["paths"])
    schemas = document["components"]["schemas"]
    completion_body = document["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert completion_body["schema"] == {"$ref": "#/components/schemas/CompletionRequest"}
    fields = schemas["CompletionRequest"]["properties"]
    assert {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream"} <= set(fields)
    assert fields["seed"]["anyOf"][0] == {"type": "integer", "minimum": -(1 << 63), "maximum": (1 << 64) - 1}
    assert set(schemas["CompletionRequest"]["required"]) == {"model", "prompt"}
    assert set(schemas["ChatCompletionRequest"]["required"]) == {"model", "messages"}
    assert "echo" not in fields and "echo" in document["info"]["description"]  # refused, and said so
    error_schema = document["paths"]["/v1/completions"]["post"]["responses"]["400"]["content"]["application/json"]
    assert error_schema["schema"]["$ref"] == "#/components/schemas/ErrorResponse"
    assert document["paths"]["/v1/completions"]["post"]["security"] == [{"bearer": []}]


def disconnects_seen(server) -> float:
    """The server's count of bodies cut short (answered 400 to nobody), from /metrics."""
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith('gonogo_requests_total{route="/v1/completions",status="400"}'):
            return float(line.split()[-1])
    return 0.0


def test_a_client_disconnecting_mid_body_logs_no_traceback(server, client):
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    before = disconnects_seen(server)
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 5000\r\n\r\n"
                           b'{"model": "gonogo", "prompt": "')
        time.sleep(0.2)  # the server is reading the body
    deadline = time.monotonic() + 10
    while disconnects_seen(server) == before and time.monotonic() < deadline:  # the server noticed
        time.sleep(0.05)
    assert "Traceback" not in server.log_text() and "Exception" not in server.log_text(), server.log_text()[-2000:]
    assert disconnects_seen(server) == before + 1
    assert_still_serving(server, client)


@pytest.fixture
def hypothesis_home(tmp_path):
    """hypothesis keeps caches in ./.hypothesis by default; the test leaves nothing in the checkout."""
    import hypothesis.configuration

    hypothesis.configuration.set_hypothesis_home_dir(tmp_path / "hypothesis")
    yield
    hypothesis.configuration.set_hypothesis_home_dir(None)


def test_fuzz_every_route_from_the_openapi_document(server, client, hypothesis_home):
    """schemathesis: schema-valid and schema-invalid requests; never a 5xx, always the error shape."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import negative_data_rejection

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    statuses: dict[int, int] = {}

    def error_shape(ctx, response, case):
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code >= 400:
            error = json.loads(response.content)["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], error

    def fuzz(operation, mode, examples, checks) -> None:
        # bounded: a fixed number of examples, derandomized so CI sees the same requests every run
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            response = case.call(headers=AUTH, timeout=60)
            case.validate_response(response, checks=checks, headers=AUTH)

        run()

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 6
    for operation in operations:
        if operation.method.upper() == "POST":  # the bodies are where the risk is
            # schema-invalid requests must be refused (4xx); schema-valid ones may still meet a limit
            fuzz(operation, schemathesis.GenerationMode.NEGATIVE, 40,
                 [not_a_server_error, error_shape, negative_data_rejection])
            fuzz(operation, schemathesis.GenerationMode.POSITIVE, 40, [not_a_server_error, error_shape])
        else:  # GETs have nothing (or one free string) that could be schema-invalid
            fuzz(operation, schemathesis.GenerationMode.POSITIVE, 5, [not_a_server_error, error_shape])
    assert sum(statuses.values()) >= 100 and any(400 <= status < 500 for status in statuses), statuses
    assert statuses.get(200, 0) > 0, statuses   # it did reach the engine with valid requests
    print("fuzz statuses:", statuses)
    assert_still_serving(server, client)


def test_a_request_failing_inside_the_engine_fails_alone_with_an_openai_error(monkeypatch):
    """In process (the failure is injected): 500 with the error shape, or an error event in a stream."""
    from fastapi.testclient import TestClient

    from gonogo.data.tokenizer import ByteTokenizer
    from gonogo.infer import engine as engine_module
    from gonogo.infer.engine import Engine, EngineSettings
    from gonogo.infer.server import create_app

    from .conftest import tiny_model

    real = engine_module.sample_next

    def sample(logits, params, generator):  # a numerical bug that only requests with top_k=7 meet
        if params.top_k == 7:
            raise FloatingPointError("the model produced non-finite logits (inf or NaN)")
        return real(logits, params, generator)

    monkeypatch.setattr(engine_module, "sample_next", sample)
    engine = Engine(tiny_model(), ByteTokenizer(), EngineSettings(max_batch=4)).start()
    try:
        http = TestClient(create_app(engine, model_name="gonogo"))
        bad = completion(top_k=7, max_tokens=8)
        error = assert_openai_error(http.post("/v1/completions", json=bad), 500)
        assert error["code"] == "generation_failed" and "non-finite logits" in error["message"]
        assert_openai_error(http.post("/v1/chat/completions", json=chat(top_k=7)), 500)

        lines = [line for line in http.post("/v1/chat/completions", json=chat(top_k=7, stream=True)).text.split("\n\n")
                 if line]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["code"] == "generation_failed"

        fine = http.post("/v1/completions", json=completion(max_tokens=5, temperature=0))
        assert fine.status_code == 200 and fine.json()["usage"]["completion_tokens"] == 5
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["engine_restarts"] == 0

        def broken_encode(text):  # a bug outside the engine: still the error shape, and no details leak
            raise KeyError("internal state")

        monkeypatch.setattr(engine.tokenizer, "encode", broken_encode)
        buggy = TestClient(create_app(engine, model_name="gonogo"), raise_server_exceptions=False)
        error = assert_openai_error(buggy.post("/v1/completions", json=completion()), 500)
        assert error["code"] == "internal_error" and "internal state" not in error["message"]
    finally:
        engine.stop()
