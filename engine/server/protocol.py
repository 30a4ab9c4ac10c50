"""The OpenAI request bodies the server accepts (pydantic, strict: an unknown field or a wrong type is HTTP 400) and
the error body every failure answers with: {"error": {"message", "type", "param", "code"}}.

Fields follow OpenAI's /v1/completions and /v1/chat/completions plus vLLM's extensions (top_k, ignore_eos,
stop_token_ids, min_tokens). Accepted but unsupported values (n > 1, penalties, logit_bias, echo, suffix) are a 400
naming the field, never ignored silently.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.responses import JSONResponse

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 500: "server_error", 503: "service_unavailable"}  # fmt: skip


class APIError(Exception):
    """An HTTP error with an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return error_body(self.message, ERROR_TYPES.get(self.status, "invalid_request_error"), self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def validation_error(exc: ValidationError) -> APIError:
    """The first problem of a body that failed validation, as a 400 naming the field."""
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ())]
    if err.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {err.get('msg')}", code="invalid_json")
    if err.get("type") == "extra_forbidden":
        return APIError(400, f"unknown field {'.'.join(loc)!r}: not part of this API", param=".".join(loc))
    if not loc and err.get("type") == "model_type":
        return APIError(400, "the body must be a JSON object")
    return APIError(400, f"{'.'.join(loc)}: {err.get('msg')}", param=loc[0] if loc else None)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool | None = False  # a last chunk with usage and no choices
    continuous_usage_stats: bool | None = False  # usage in every chunk


class _Sampling(_Body):
    """The fields both endpoints share."""

    model: str | None = None
    max_tokens: int | None = None  # None = up to the context
    temperature: float | None = None  # None = 1.0 (OpenAI's default); 0 = greedy
    top_p: float | None = None
    top_k: int | None = None  # vLLM: -1 or 0 = off
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM
    seed: int | None = None
    user: str | None = None  # also the session id of KV reuse (unless an X-Session-Id header is given)
    ignore_eos: bool = False  # vLLM
    min_tokens: int = 0  # vLLM; only met trivially here (ignore_eos and no stop), else refused
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # top-k logprobs of each token, 0..20
    echo: bool = False
    suffix: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_dict(self) -> dict[str, Any]:
        text = self.content if isinstance(self.content, str) or self.content is None else "".join(p.text for p in self.content)
        d: dict[str, Any] = {"role": self.role, "content": text or ""}
        if self.name is not None:
            d["name"] = self.name
        return d


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None  # 0..20, with logprobs = true
    add_generation_prompt: bool = True  # vLLM
