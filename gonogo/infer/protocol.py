"""The OpenAI wire format: request models, response and stream-chunk objects, error bodies.

Field names and shapes follow openai-python's types (``Completion``, ``ChatCompletion``,
``ChatCompletionChunk``) and what vLLM's OpenAI server sends, so the real ``openai`` client and
vLLM's ``bench serve`` read our responses unchanged. Unknown request fields are ignored (as vLLM
does) so that clients which send extra OpenAI options still work; the OpenAI and vLLM fields that
would change what an answer means (logprobs, echo, suffix, best_of, tools, response_format,
penalties, ...) are refused with a 400 that names them unless they are at their "off" value.

The body is parsed defensively, so that no input can make a 5xx: strict UTF-8, numbers of at
most ``MAX_NUMBER_CHARS`` characters (Python refuses ints beyond 4300 digits with a ValueError),
no NaN or Infinity, at most ``MAX_JSON_DEPTH`` levels of nesting (the C decoder would hit a
RecursionError) and no lone surrogates (``"\\ud800"`` is valid JSON but no text).
"""

from __future__ import annotations

import json
import time
import uuid
import math
from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_JSON_DEPTH = 32       # a chat request needs 5 (body, messages, message, content parts, part)
MAX_NUMBER_CHARS = 100    # a 64-bit seed has 20 digits
# what torch.Generator.manual_seed takes (gonogo.infer.sampling checks the same; no torch import here)
MIN_SEED = -(1 << 63)
MAX_SEED = (1 << 64) - 1


class APIError(Exception):
    """An error answered to the client as OpenAI-style JSON with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape (what ``APIError.body`` sends): every 4xx and 5xx has this body."""
    error: ErrorBody


class _Request(BaseModel):
    # strict: "12" is not an integer and 1.5 is not a max_tokens; extra OpenAI fields are ignored
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(default=0, ge=-1, description="0 or -1: no top-k filter")
    n: int = Field(default=1, ge=1)
    seed: Optional[int] = Field(default=None, ge=MIN_SEED, le=MAX_SEED,
                                description="choice i samples with seed + i, which must also fit in 64 bits")
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional["StreamOptions"] = None
    ignore_eos: bool = False          # vLLM's extension: benchmarks want fixed output lengths

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _int_is_a_float(cls, value: Any) -> Any:
        # JSON has one number type: 1 is a valid temperature (strict mode would refuse it)
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value

    @field_validator("max_tokens", "top_k", "n", "seed", mode="before")
    @classmethod
    def _integral_float_is_an_int(cls, value: Any) -> Any:
        # ... and 8.0 is an integer (JSON Schema says so), while 8.5 and "8" stay refused
        return _as_int(value)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)



class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class CompletionRequest(_Request):
    prompt: Union[str, list[int], list[str]]

    @field_validator("prompt", mode="before")
    @classmethod
    def _integral_token_ids(cls, value: Any) -> Any:
        return [_as_int(item) for item in value] if isinstance(value, list) else value

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("only one prompt per request is supported (use n for several choices)")
            return value[0]
        return value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)

    @field_validator("max_completion_tokens", mode="before")
    @classmethod
    def _integral_float_is_an_int(cls, value: Any) -> Any:
        return _as_int(value)


def _as_int(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_Request.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()


def _off(*values: Any) -> Callable[[Any, dict], bool]:
    return lambda value, _body: any(value == off and type(value) is type(off) for off in values)


def _best_of_off(value: Any, body: dict) -> bool:
    # OpenAI: best_of == n returns the n samples themselves, which is what we do anyway
    return value is None or (type(value) is int and value in (1, body.get("n", 1)))


def _text_format(value: Any, _body: dict) -> bool:
    return value is None or value == {"type": "text"}


_NOT_SET = _off(None)
_NOT_ON = _off(None, False)
_ZERO = _off(None, 0, 0.0)
_EMPTY = _off(None, [], {})
# Fields of the OpenAI API (and vLLM's extensions) that would change what the answer means. Each
# is refused with a 400 naming it unless it is absent or at its "off" value: ignoring one silently
# would hand a client an answer to a question it did not ask.
REFUSED_FIELDS: dict[str, Callable[[Any, dict], bool]] = {
    "echo": _NOT_ON, "suffix": _off(None, ""), "best_of": _best_of_off,
    "logprobs": _off(None, False), "top_logprobs": _ZERO, "prompt_logprobs": _NOT_SET,
    "logit_bias": _EMPTY, "presence_penalty": _ZERO, "frequency_penalty": _ZERO,
    "tools": _EMPTY, "functions": _EMPTY, "tool_choice": _off(None, "none", "auto"),
    "function_call": _off(None, "none", "auto"), "response_format": _text_format,
    "modalities": _off(None, ["text"]), "audio": _NOT_SET, "prediction": _NOT_SET,
    "web_search_options": _NOT_SET, "reasoning_effort": _NOT_SET,
    # vLLM's sampling and decoding extensions
    "repetition_penalty": _off(None, 1, 1.0), "min_p": _ZERO, "min_tokens": _ZERO,
    "use_beam_search": _NOT_ON, "length_penalty": _off(None, 1, 1.0),
    "stop_token_ids": _EMPTY, "include_stop_str_in_output": _NOT_ON, "allowed_token_ids": _NOT_SET,
    "bad_words": _EMPTY, "truncate_prompt_tokens": _NOT_SET, "structured_outputs": _NOT_SET,
    "guided_json": _NOT_SET, "guided_regex": _NOT_SET, "guided_choice": _NOT_SET,
    "guided_grammar": _NOT_SET, "continue_final_message": _NOT_ON,
    "add_generation_prompt": _off(None, True), "chat_template": _NOT_SET,
}


def _parse_int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise APIError(400, f"a number in the request body has {len(text)} digits; at most {MAX_NUMBER_CHARS} "
                            f"are accepted")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise APIError(400, f"a number in the request body is {len(text)} characters long; at most "
                            f"{MAX_NUMBER_CHARS} are accepted")
    value = float(text)
    if not math.isfinite(value):
        raise APIError(400, f"the number {text} in the request body is too large for a 64-bit float")
    return value


def _parse_constant(name: str) -> Any:
    raise APIError(400, f"{name} is not valid JSON (JSON numbers are finite)")


def _check_tree(data: Any) -> None:
    """Depth and text of every value, without recursion (a deep body must not exhaust the stack)."""
    stack: list[tuple[Any, int, tuple]] = [(data, 1, ())]
    while stack:
        value, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"the request body is nested more than {MAX_JSON_DEPTH} levels deep")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str):
                _check_text(key, path)
            if isinstance(item, str):
                _check_text(item, path + (key,))
            elif isinstance(item, (dict, list)):
                stack.append((item, depth + 1, path + (key,)))


def _check_text(text: str, path: tuple) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        param = ".".join(str(part) for part in path) or None
        raise APIError(400, f"{param or 'the request body'}: the text holds a lone UTF-16 surrogate "
                            f"({text[error.start]!r}), which is not a character", param=param) from None


def load_json(raw: bytes) -> Any:
    """Bytes -> a JSON value, or an APIError(400) for anything that is not plain, bounded JSON."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise APIError(400, f"the request body is not UTF-8: {error}") from None
    try:
        data = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except json.JSONDecodeError as error:
        raise APIError(400, f"the request body is not valid JSON: {error}") from None
    except RecursionError:
        raise APIError(400, f"the request body is nested more than {MAX_JSON_DEPTH} levels deep") from None
    if isinstance(data, (dict, list)):
        _check_tree(data)
    elif isinstance(data, str):
        _check_text(data, ())
    return data


def parse_request(model: type[_Request], raw: bytes) -> Any:
    """Bytes of a request body -> a validated request, or an APIError(400) naming the field."""
    data = load_json(raw)
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    refused = [name for name, is_off in REFUSED_FIELDS.items() if name in data and not is_off(data[name], data)]
    if refused:
        raise APIError(400, f"{', '.join(refused)}: not supported by this server, which would otherwise answer "
                            f"a different question than the one asked; leave {'them' if len(refused) > 1 else 'it'} "
                            f"out", param=refused[0], code="unsupported_parameter")
    messages = data.get("messages")
    if isinstance(messages, list):
        for index, message in enumerate(messages):
            if isinstance(message, dict) and message.get("tool_calls"):
                raise APIError(400, f"messages.{index}.tool_calls: tool calls are not supported by this server",
                               param=f"messages.{index}.tool_calls", code="unsupported_parameter")
    try:
        request = model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first.get("loc", ())) or None
        raise APIError(400, f"{param}: {first.get('msg', 'invalid value')}", param=param) from None
    if request.seed is not None and request.seed + request.n - 1 > MAX_SEED:
        raise APIError(400, f"seed={request.seed} with n={request.n}: choice i samples with seed + i, and "
                            f"seed + n - 1 must be at most {MAX_SEED} (64 bits)", param="seed")
    return request


# -- responses --------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(request_id: str, model: str, created: int, texts: list[str], reasons: list[str],
                        prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": request_id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}
                    for index, (text, reason) in enumerate(zip(texts, reasons))],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_response(request_id: str, model: str, created: int, texts: list[str], reasons: list[str],
                  prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": index, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": reason}
                    for index, (text, reason) in enumerate(zip(texts, reasons))],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(request_id: str, model: str, created: int, index: int, text: str,
                     finish_reason: Optional[str], with_usage: bool) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": request_id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def chat_chunk(request_id: str, model: str, created: int, index: int, delta: dict[str, Any],
               finish_reason: Optional[str], with_usage: bool) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(request_id: str, model: str, created: int, object_name: str,
                prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The last chunk when stream_options.include_usage is set: empty choices, the usage."""
    return {"id": request_id, "object": object_name, "created": created, "model": model,
            "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event exactly as OpenAI sends it: ``data: <json>`` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode("utf-8")
