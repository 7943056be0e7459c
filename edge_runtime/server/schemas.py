"""Request validation for POST /v1/chat/completions (the OpenAI Chat Completions shape).

A request is parsed from raw bytes so that malformed JSON and wrong types both
become OpenAI-shaped 400s naming the offending field, instead of FastAPI's 422.
Fields the runtime cannot honour (n > 1, logprobs) are refused, not ignored.
"""
from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal, Union

from edge_llama import JSON_GBNF
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from ..options import GenerationOptions
from ..tool_calls import ToolError, ToolPlan, plan_tools
from ..sampling import schema_to_grammar
from .errors import ApiError, bad_request

MAX_STOPS = 16


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ImageURL(_Model):
    url: str = Field(min_length=1)
    detail: str | None = None


class TextPart(_Model):
    type: Literal["text"]
    text: str


def _url_object(value: Any) -> Any:
    return {"url": value} if isinstance(value, str) else value  # some clients send the URL itself


URL = Annotated[ImageURL, BeforeValidator(_url_object)]


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: URL


class VideoPart(_Model):
    """vLLM's spelling of a video: {"type": "video_url", "video_url": {"url": ...}}."""

    type: Literal["video_url"]
    video_url: URL


Part = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class FunctionCall(_Model):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallEntry(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Part] | None = None
    tool_calls: list[ToolCallEntry] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(_Model):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Model):
    include_usage: bool = False


class ChatRequest(_Model):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repeat_penalty: float | None = Field(default=None, gt=0.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # llama-server's extension: generate max_tokens whatever the model says
    n: int = Field(default=1, ge=1, le=1)
    logprobs: bool | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings are allowed")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: Any) -> Any:
        for key, bias in (value or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return value

    @property
    def token_bias(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: Any) -> Any:
        if value:
            raise ValueError("logprobs are not supported by this server")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def parse_chat_request(body: bytes) -> ChatRequest:
    """Raw body -> validated request, or a 400 naming the first problem."""
    data = load_json(body)
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_json")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


MAX_JSON_DEPTH = 64  # tool schemas nest; nothing legitimate nests deeper
MAX_NUMBER_CHARS = 40  # 1e308 and 2**64 fit; a 4000-digit integer does not


def load_json(body: bytes) -> Any:
    """Parse a request body with bounded nesting and number sizes (400s, never a RecursionError)."""
    try:
        data = json.loads(body, parse_int=_bounded_int, parse_float=_bounded_float)  # NaN: the fields say no
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", None, "invalid_json") from None
    except RecursionError:
        data = None
        depth = MAX_JSON_DEPTH + 1
    except ValueError as exc:  # from the number hooks
        raise bad_request(f"the request body is not acceptable JSON: {exc}", None, "invalid_json") from None
    else:
        depth = json_depth(data, MAX_JSON_DEPTH + 1)
    if depth > MAX_JSON_DEPTH:
        raise bad_request(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels", None,
                          "json_too_deep")
    return data


def json_depth(value: Any, stop: int) -> int:
    """Nesting depth of parsed JSON, iteratively, giving up once `stop` is reached."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest >= stop:
                return deepest
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _bounded_int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise ValueError(f"a number has {len(text)} digits (at most {MAX_NUMBER_CHARS})")
    return int(text)


def _bounded_float(text: str) -> float:
    value = float(text) if len(text) <= MAX_NUMBER_CHARS else math.inf
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]}{'...' if len(text) > 20 else ''} is out of range")
    return value



def tool_plan(req: ChatRequest) -> ToolPlan:
    """Validate tools / tool_choice into a ToolPlan (400s naming the field)."""
    choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedToolChoice) else req.tool_choice
    try:
        return plan_tools(req.tools, choice, req.parallel_tool_calls is not False)
    except ToolError as exc:
        raise bad_request(str(exc), exc.param, "invalid_tools") from None


def generation_options(req: ChatRequest, plan: ToolPlan | None = None) -> GenerationOptions:
    """The runtime's options for this request; unset fields keep the runtime defaults.

    max_tokens stays None when not given: the scheduler then fills what the slot has room for,
    up to the server's default.
    """
    values: dict[str, Any] = {"max_tokens": req.max_completion_tokens or req.max_tokens}
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repeat_penalty", "seed"):
        value = getattr(req, name)
        if value is not None:
            values[name] = value
    if values.get("top_p") == 0.0:  # OpenAI's "most likely token only"
        values["top_p"], values["temperature"] = 1.0, 0.0
    if req.stop is not None:
        values["stop"] = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
    grammar = response_grammar(req.response_format)
    call_rules = plan.grammar() if plan is not None else None
    if call_rules is not None:
        if grammar is not None:
            raise bad_request("response_format cannot be combined with a forced tool call (tool_choice "
                              "'required' or a named function)", "response_format")
        grammar = call_rules
    if grammar is not None:
        values["grammar"] = grammar
    try:
        return GenerationOptions(**values)
    except ValueError as exc:
        raise bad_request(str(exc)) from None


def response_grammar(fmt: ResponseFormat | None) -> str | None:
    """GBNF for response_format: any JSON object, or one matching a JSON schema."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return JSON_GBNF
    if fmt.json_schema is None or not fmt.json_schema.schema_:
        raise bad_request("response_format json_schema needs json_schema.schema", "response_format.json_schema")
    try:
        return schema_to_grammar(fmt.json_schema.schema_)
    except ValueError as exc:
        raise bad_request(str(exc), "response_format.json_schema.schema", "invalid_json_schema") from None


def template_messages(req: ChatRequest) -> list[dict]:
    """Plain dicts in the shape `messages.split_messages` reads (developer -> system)."""
    out = []
    for message in req.messages:
        content = message.content
        if isinstance(content, list):
            content = [part.model_dump(exclude_none=True) for part in content]
        role = "system" if message.role == "developer" else message.role
        entry: dict[str, Any] = {"role": role, "content": content if content is not None else ""}
        if message.tool_calls:
            entry["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": (
                    c.function.arguments if isinstance(c.function.arguments, str)
                    else json.dumps(c.function.arguments, ensure_ascii=False))}}
                for c in message.tool_calls]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        out.append(entry)
    return out


def _validation_error(exc: ValidationError) -> ApiError:
    # With unions pydantic reports one error per branch; the deepest names the real problem.
    first = max(exc.errors(), key=lambda e: len(e.get("loc", ())))
    param = _param(first.get("loc", ()))
    message = first.get("msg", "invalid value")
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    return bad_request(f"{param}: {message}" if param else message, param or None)


_TYPE_TAGS = {"str", "int", "float", "bool", "none"}


def _param(loc: tuple[Any, ...]) -> str:
    """('messages', 0, 'content', 'list[tagged-union[..]]', 1, 'text', 'text') -> 'messages[0].content[1].text'.

    Union branch names ('str', 'list[...]') and discriminator tags are not fields: drop them.
    """
    out = ""
    skip_tag = expect_tag = False
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            skip_tag, expect_tag = expect_tag, False
            continue
        part = str(part)
        if "[" in part or part in _TYPE_TAGS:
            expect_tag = expect_tag or "tagged-union" in part
            continue
        if skip_tag:
            skip_tag = False
            continue
        out += f".{part}" if out else part
    return out
