"""The OpenAI wire format: request models, response and stream-chunk objects, error bodies.

Field names and shapes follow openai-python's types (``Completion``, ``ChatCompletion``,
``ChatCompletionChunk``) and what vLLM's OpenAI server sends, so the real ``openai`` client and
vLLM's ``bench serve`` read our responses unchanged. Unknown request fields are ignored (as vLLM
does) so that clients which send extra OpenAI options still work; fields we cannot honour
(logprobs, echo, penalties other than 0) are refused with a 400 that names them.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


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


class _Request(BaseModel):
    # strict: "12" is not an integer and 1.5 is not a max_tokens; extra OpenAI fields are ignored
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    n: int = Field(default=1, ge=1)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional["StreamOptions"] = None
    logprobs: Optional[Any] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False          # vLLM's extension: benchmarks want fixed output lengths

    @field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty", mode="before")
    @classmethod
    def _int_is_a_float(cls, value: Any) -> Any:
        # JSON has one number type: 1 is a valid temperature (strict mode would refuse it)
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value

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

    def unsupported(self) -> Optional[str]:
        if self.logprobs not in (None, False, 0):
            return "logprobs"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty" if self.presence_penalty else "frequency_penalty"
        return None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class CompletionRequest(_Request):
    prompt: Union[str, list[int], list[str]]
    echo: bool = False

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


_Request.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()


def parse_request(model: type[_Request], raw: bytes) -> Any:
    """Bytes of a request body -> a validated request, or an APIError(400) naming the field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        request = model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first.get("loc", ())) or None
        raise APIError(400, f"{param}: {first.get('msg', 'invalid value')}", param=param) from None
    bad = request.unsupported()
    if bad:
        raise APIError(400, f"{bad} is not supported by this server", param=bad)
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
