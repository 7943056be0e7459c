"""OpenAI-shaped errors: every refusal the server makes is one `ApiError`.

Clients written for the OpenAI API read `error.message`, `error.type`,
`error.param` and `error.code`; the HTTP status tells their retry logic whether
trying again can help (429, 503) or not (400, 401, 413).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from edge_common.errors import EdgeError

from ..errors import (ContextOverflowError, DecodeError, EdgeRuntimeError, EmptyPromptError, EngineClosedError,
                      GrammarError, ImageNotCachedError, ModelLoadError)
from edge_runtime.vision.images import ImageError
from edge_runtime.core.template import TemplateError


@dataclass
class ApiError(EdgeError):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:  # crosses the engine process boundary
        return (ApiError, (self.status, self.message, self.type, self.param, self.code, dict(self.headers)))

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def timeout_error(timeout_s: float) -> ApiError:
    return ApiError(504, f"the request did not finish within the server's timeout of {timeout_s:g} s",
                    "timeout_error", None, "timeout")


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", "server_error", None, "shutting_down")


def unavailable(state: str, error: str | None = None, last_exit: str | None = None) -> ApiError | None:
    """The 503 for an engine that is not ready (None when it is): loading, stalled, restarting or failed."""
    if state == "ready":
        return None
    if state == "loading":
        return ApiError(503, "the model is still loading; retry shortly", "server_error", None, "model_loading",
                        {"Retry-After": "2"})
    if state == "stalled":
        return ApiError(503, f"the engine process stopped making progress and is being restarted ({last_exit}); "
                        "retry shortly", "server_error", None, "engine_stalled", {"Retry-After": "5"})
    if state == "restarting":
        return ApiError(503, f"the engine is restarting after it stopped ({last_exit}); retry shortly",
                        "server_error", None, "engine_restarting", {"Retry-After": "2"})
    return ApiError(503, f"the model is not available: {error or state}", "server_error", None, "model_unavailable")


def queue_full(waiting: int, parallel: int, queue_size: int, retry_after_s: int) -> ApiError:
    return ApiError(429, f"the server is busy: {waiting} request(s) already wait for one of {parallel} slot(s) "
                    f"(--queue-size {queue_size}); retry later", "rate_limit_error", None, "queue_full",
                    {"Retry-After": str(retry_after_s)})


_FIELD = re.compile(r"messages\[\d+\](?:\.content\[\d+\])?")


def leading_field(message: str) -> str | None:
    """'messages[1].content[0].detail must be ...' -> 'messages[1].content[0]': the runtime names the
    part at fault first, and OpenAI clients read it from `param`."""
    match = _FIELD.match(message)
    return match.group(0) if match else None


def from_exception(exc: BaseException) -> ApiError:
    """What a runtime exception means to the client: its fault (400) or ours (500)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, GrammarError):
        return bad_request(str(exc), "grammar", "invalid_grammar")
    if isinstance(exc, ImageNotCachedError):  # the request is well formed; the server's state lacks the image
        return ApiError(409, str(exc), "invalid_request_error", "messages", "image_not_cached")
    if isinstance(exc, ContextOverflowError):
        return ApiError(400, str(exc), "invalid_request_error", "messages", "context_length_exceeded")
    if isinstance(exc, (DecodeError, ModelLoadError, EngineClosedError)):
        return ApiError(500, f"the model failed: {exc}", "server_error", None, "engine_error")
    if isinstance(exc, EmptyPromptError):
        return bad_request(str(exc), "messages")
    if isinstance(exc, (ImageError, TemplateError, EdgeRuntimeError, ValueError)):
        return bad_request(str(exc), getattr(exc, "param", None) or leading_field(str(exc)))
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error", None, "internal_error")
