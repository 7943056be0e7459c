"""Request validation for POST /v1/chat/completions (the OpenAI Chat Completions shape).

A request is parsed from raw bytes so that malformed JSON and wrong types both
become OpenAI-shaped 400s naming the offending field, instead of FastAPI's 422.
llama-server's own request fields are honoured where the runtime can (grammar,
json_schema, n_predict, cache_prompt); every other top-level field, and values
the runtime cannot honour, are refused with a 400 naming them,
never ignored: a client that relies on a field must not get an answer without it.
"""
from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal, Union

from edge_llama import JSON_GBNF
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from edge_runtime.core.options import GenerationOptions
from edge_runtime.vision.image_input import ImageInput
from edge_runtime.chat.tool_calls import MAX_JSON_DEPTH, ToolError, ToolPlan, json_depth, plan_tools
from edge_runtime.core.sampling import schema_to_grammar
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


class ImageRefPart(_Model):
    """An image by its digest alone, as a restored conversation gives it back (GET /v1/conversations/{id}
    of one saved without its data: URI, e.g. by VisionChat): usable while the server still holds the
    image in a slot's cells or an encoder cache, else a 409 asking for its pixels."""

    type: Literal["image"]
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    width: int = Field(ge=1, le=1 << 16)
    height: int = Field(ge=1, le=1 << 16)


Part = Annotated[Union[TextPart, ImagePart, ImageRefPart, VideoPart], Field(discriminator="type")]


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
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # llama-server: json_object + schema


class StreamOptions(_Model):
    include_usage: bool = False


class ChatRequest(_Model):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)  # parse_chat_request names the field first

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
    n: int = Field(default=1, ge=1, le=128)  # choices, one slot each (more than --parallel: refused)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)  # OpenAI's bounds
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # llama-server's extensions (tools/server/server-schema.cpp, server-common.cpp)
    n_predict: int | None = Field(default=None, ge=-1)  # max_tokens under its llama.cpp name; -1: no limit
    grammar: str | None = None  # GBNF constraining the answer
    json_schema: dict[str, Any] | None = None  # a JSON schema constraining the answer
    repeat_last_n: int | None = Field(default=None, ge=0)
    cache_prompt: bool = True  # false: evaluate the whole prompt again instead of reusing the slot's cache
    id_slot: int = -1  # -1: the server chooses; pinning a slot is refused
    # Thinking models: "auto"/"deepseek" put the reasoning in reasoning_content, "none" leaves it in content.
    reasoning_format: Literal["auto", "deepseek", "none"] | None = None
    # Reasoning tokens before the answer is forced to start; -1: unlimited (llama-server reads both names).
    reasoning_budget_tokens: int | None = Field(default=None, ge=-1)
    thinking_budget_tokens: int | None = Field(default=None, ge=-1)
    chat_template_kwargs: dict[str, Any] | None = None  # extra template variables, e.g. {"enable_thinking": false}
    # Who is asking, not what to answer: accepted and not used (docs/server-compat.md).
    user: str | None = None
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # the slot with the longest shared prefix is reused anyway

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > MAX_STOPS:
            # a plain ValueError: pydantic turns a validator's ValueError into a 400 naming the field
            raise ValueError(f"at most {MAX_STOPS} stop strings are allowed")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: Any) -> Any:
        for key, bias in (value or {}).items():
            if not key.lstrip("-").isdigit():
                # a plain ValueError: pydantic turns a validator's ValueError into a 400 naming the field
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                # a plain ValueError: pydantic turns a validator's ValueError into a 400 naming the field
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return value

    @property
    def token_bias(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("logprobs"):
            # a plain ValueError: pydantic turns a validator's ValueError into a 400 naming the field
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, value: Any) -> Any:
        for key in RESERVED_TEMPLATE_VARIABLES & set(value or {}):
            # a plain ValueError: pydantic turns a validator's ValueError into a 400 naming the field
            raise ValueError(f"{key!r} is set by the server itself; it cannot be a chat_template_kwargs entry")
        if value and "enable_thinking" in value and not isinstance(value["enable_thinking"], bool):
            raise ValueError("enable_thinking must be true or false")  # llama-server refuses a string too
        return value

    @property
    def thinking_budget(self) -> int | None:
        """GenerationOptions.max_thinking_tokens: reasoning_budget_tokens, else thinking_budget_tokens
        (llama-server's precedence); -1 or absent: no limit."""
        value = self.reasoning_budget_tokens if self.reasoning_budget_tokens is not None \
            else self.thinking_budget_tokens
        return None if value is None or value == -1 else value

    @property
    def answer_top_logprobs(self) -> int | None:
        """GenerationOptions.top_logprobs: None when no logprobs are asked."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("n_predict")
    @classmethod
    def _n_predict(cls, value: Any) -> Any:
        if value == 0:
            # a plain ValueError: pydantic turns a validator's ValueError into a 400 naming the field
            raise ValueError("n_predict must be -1 (no limit) or at least 1; "
                             "evaluating a prompt without an answer is not supported")
        return value

    @field_validator("id_slot")
    @classmethod
    def _any_slot(cls, value: Any) -> Any:
        if value != -1:
            # a plain ValueError: pydantic turns a validator's ValueError into a 400 naming the field
            raise ValueError("edge-serve chooses the slot itself (the one holding the longest shared prefix); "
                             "send -1 or leave id_slot out")
        return value

    @property
    def max_answer_tokens(self) -> int | None:
        """llama-server's precedence: n_predict, then max_completion_tokens, then max_tokens (-1: no limit)."""
        for value in (self.n_predict, self.max_completion_tokens, self.max_tokens):
            if value is not None:
                return None if value == -1 else value
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# llama-server's request fields that edge-serve does not implement: each gets a 400 that says so.
# From tools/server/server-schema.cpp (make_llama_cmpl_schema) and server-common.cpp
# (oaicompat_chat_params_parse) of the llama.cpp vendored in llama-cpp-python 0.3.36.
LLAMA_SERVER_ONLY = frozenset({
    "verbose", "timings_per_token", "return_tokens", "return_progress", "sse_ping_interval", "n_indent", "n_keep",
    "n_discard", "n_cmpl", "n_cache_reuse", "t_max_predict_ms", "t_max_prompt_ms", "response_fields",
    "top_n_sigma", "xtc_probability", "xtc_threshold", "typical_p", "dynatemp_range", "dynatemp_exponent",
    "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers", "mirostat",
    "mirostat_tau", "mirostat_eta", "adaptive_target", "adaptive_decay", "n_probs", "min_keep", "backend_sampling",
    "post_sampling_probs", "lora", "grammar_lazy", "grammar_triggers", "grammar_type", "preserved_tokens",
    "chat_format", "generation_prompt", "parse_tool_calls", "chat_parser",
    "continue_final_message", "add_generation_prompt", "echo", "reasoning_control",
    "reasoning_budget_start_tag", "reasoning_budget_end_tags", "reasoning_budget_end_tag",
    "reasoning_budget_message", "samplers",
})

# Variables the server passes to the chat template itself (chat_template_kwargs may not set them).
RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "add_generation_prompt", "tools", "bos_token", "eos_token"})


def parse_chat_request(body: bytes) -> ChatRequest:
    """Raw body -> validated request, or a 400 naming the first problem."""
    data = load_json(body)
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_json")
    fields = known_fields(data)
    for name, value in fields.items():  # free-form JSON (tools' schemas, json_schema): typed fields refuse NaN
        where = _non_finite(value, name)
        if where is not None:
            raise bad_request(f"{where} is NaN or infinite: JSON has no such numbers; give a finite number", name)
    try:
        return ChatRequest.model_validate(fields)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _non_finite(value: Any, path: str) -> str | None:
    """The path of the first NaN or infinity in `value` (json.loads takes the literals NaN and Infinity
    without calling the number hooks); None if every number is finite. Depth is bounded by load_json."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    if isinstance(value, dict):
        items = ((f"{path}.{k}", v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for sub, v in items:
        found = _non_finite(v, sub)
        if found is not None:
            return found
    return None


def known_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The body without unknown fields set to null (clients send unset options so), or a 400
    naming the first unknown field that has a value."""
    known = set(ChatRequest.model_fields) | {f.alias for f in ChatRequest.model_fields.values() if f.alias}
    for name, value in data.items():
        if name in known or value is None:
            continue
        why = ("a llama-server extension edge-serve does not implement" if name in LLAMA_SERVER_ONLY
               else "not a field edge-serve knows")
        raise bad_request(f"Unrecognized request argument supplied: {name} ({why}; edge-serve refuses what it "
                          "would otherwise ignore: leave it out, see docs/server-compat.md)",
                          name, "unknown_parameter")
    return {name: value for name, value in data.items() if name in known or value is not None}


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
        field = too_deep_field(body.decode("utf-8", "replace"), MAX_JSON_DEPTH)
        raise bad_request(f"{field or 'the request body'} nests JSON deeper than {MAX_JSON_DEPTH} levels", field,
                          "json_too_deep")
    return data


def too_deep_field(text: str, limit: int) -> str | None:
    """The top-level field of a JSON object under which nesting first passes `limit` (None: not
    inside one). A scan of the text, not a parse: the body may be too deep for Python's parser."""
    depth, key, last_string, i = 0, None, None, 0
    while i < len(text):
        char = text[i]
        if char == '"':
            end = i + 1
            while end < len(text) and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            if depth == 1:
                last_string = text[i + 1:end]
            i = end + 1
            continue
        if char in "{[":
            depth += 1
            if depth > limit:
                return key
        elif char in "}]":
            depth -= 1
        elif char == ":" and depth == 1:
            key = last_string
        i += 1
    return None


def _bounded_int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        # a plain ValueError: json.loads' number hook: load_json turns it into a 400
        raise ValueError(f"a number has {len(text)} digits (at most {MAX_NUMBER_CHARS})")
    return int(text)


def _bounded_float(text: str) -> float:
    value = float(text) if len(text) <= MAX_NUMBER_CHARS else math.inf
    if not math.isfinite(value):
        # a plain ValueError: json.loads' number hook: load_json turns it into a 400
        raise ValueError(f"the number {text[:20]}{'...' if len(text) > 20 else ''} is out of range")
    return value



def tool_plan(req: ChatRequest) -> ToolPlan:
    """Validate tools / tool_choice into a ToolPlan (400s naming the field)."""
    choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedToolChoice) else req.tool_choice
    try:
        return plan_tools(req.tools, choice, req.parallel_tool_calls is not False)
    except ToolError as exc:
        raise bad_request(str(exc), exc.param, "invalid_tools") from None


def generation_options(req: ChatRequest, plan: ToolPlan | None = None, reasoning_budget: int = -1) -> GenerationOptions:
    """The runtime's options for this request; unset fields keep the runtime defaults.

    max_tokens stays None when not given: the scheduler then fills what the slot has room for,
    up to the server's default. `reasoning_budget` is the server's (-1: none), for a request without one.
    """
    budget = req.thinking_budget if req.thinking_budget is not None else reasoning_budget
    values: dict[str, Any] = {"max_tokens": req.max_answer_tokens, "top_logprobs": req.answer_top_logprobs,
                              "max_thinking_tokens": None if budget == -1 else budget,
                              "keep_think": req.reasoning_format == "none"}
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repeat_penalty", "repeat_last_n", "seed"):
        value = getattr(req, name)
        if value is not None:
            values[name] = value
    if values.get("top_p") == 0.0:  # OpenAI's "most likely token only"
        values["top_p"], values["temperature"] = 1.0, 0.0
    if req.stop is not None:
        values["stop"] = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
    grammar = answer_grammar(req)
    call_rules = plan.grammar() if plan is not None else None
    if call_rules is not None:
        if grammar is not None:
            raise bad_request(f"{grammar[0]} cannot be combined with a forced tool call (tool_choice "
                              "'required' or a named function)", grammar[0])
        grammar = ("tools", call_rules)
    if req.grammar and plan is not None and plan.active:  # llama-server refuses this too
        raise bad_request("grammar cannot be combined with tools: the tool-call markup needs the answer free "
                          "(use tool_choice 'none' or leave grammar out)", "grammar")
    if grammar is not None:
        values["grammar"] = grammar[1]
    try:
        return GenerationOptions(**values)
    except ValueError as exc:
        raise bad_request(str(exc)) from None


def answer_grammar(req: ChatRequest) -> tuple[str, str] | None:
    """(field, GBNF) for the one constraint the request asks for: `grammar` (GBNF as given),
    `json_schema` or `response_format` (any JSON object, or one matching a JSON schema).

    As llama-server (server-common.cpp): an empty grammar is none, an empty schema is any
    object, and two constraints at once are refused.
    """
    fmt = req.response_format
    asked = [name for name, given in (("grammar", bool(req.grammar)), ("json_schema", req.json_schema is not None),
                                      ("response_format", fmt is not None and fmt.type != "text")) if given]
    if len(asked) > 1:
        raise bad_request(f"give one of grammar, json_schema and response_format, not {asked[0]} and {asked[1]}",
                          asked[1])
    if not asked:
        return None
    if asked[0] == "grammar":  # llama.cpp parses it when the sampler is built: a GrammarError names `grammar`
        return "grammar", str(req.grammar)
    if asked[0] == "json_schema":
        return "json_schema", _schema_grammar(req.json_schema, "json_schema")
    assert fmt is not None
    if fmt.type == "json_object":
        if fmt.schema_ is None:
            return "response_format", JSON_GBNF
        return "response_format", _schema_grammar(fmt.schema_, "response_format.schema")
    if fmt.json_schema is None or not fmt.json_schema.schema_:
        raise bad_request("response_format json_schema needs json_schema.schema", "response_format.json_schema")
    return "response_format", _schema_grammar(fmt.json_schema.schema_, "response_format.json_schema.schema")


def _schema_grammar(schema: dict[str, Any] | None, where: str) -> str:
    try:
        return schema_to_grammar(schema or {"type": "object"})
    except ValueError as exc:
        raise bad_request(str(exc), where, "invalid_json_schema") from None


def _template_part(part: Any) -> dict:
    if isinstance(part, ImageRefPart):  # a pixel-less image: the engine finds it by its digest
        return {"type": "image", "image": ImageInput(part.digest, part.width, part.height)}
    return part.model_dump(exclude_none=True)


def template_messages(req: ChatRequest) -> list[dict]:
    """Plain dicts in the shape `messages.split_messages` reads (developer -> system)."""
    out = []
    for message in req.messages:
        content = message.content
        if isinstance(content, list):
            content = [_template_part(part) for part in content]
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
