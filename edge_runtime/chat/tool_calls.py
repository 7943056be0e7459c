"""Function calling in the model family's format: tools in the prompt, marked JSON calls out.

Qwen3-VL was trained (its chat template says so) to answer a tool request with

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, and to read results back as `<tool_response>` in a user turn.
This module renders tools for templates that do not know them, builds the GBNF
grammar that forces a call whose arguments match the tool's JSON schema (for
`tool_choice` "required" or a named function), and parses calls out of the
generated text, whole or as it streams. llama-server does the same for this
"Hermes 2 Pro" format (common/chat.cpp); MLX-VLM's server parses it the same way.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from edge_llama import SchemaConverter

from edge_common.errors import EdgeError
from edge_models import chat_format

from edge_runtime.core.template import ChatTemplate

FORMAT = chat_format()  # the default family's markup (edge_models)
CALL_OPEN, CALL_CLOSE = FORMAT.tool_call_open, FORMAT.tool_call_close
TOOLS_TEMPLATE = FORMAT.tools_template
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # fullmatch: "$" would accept a trailing newline
_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)
MAX_JSON_DEPTH = 64  # tool schemas nest; nothing legitimate nests deeper (and recursive checkers stay safe)



class ToolError(EdgeError, ValueError):
    """A tool definition or tool_choice is unusable; the message names which and why."""

    def __init__(self, message: str, param: str = "tools") -> None:
        super().__init__(message)
        self.param = param  # the request field at fault: "tools" or "tool_choice"


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: Mapping[str, Any]
    description: str = ""

    def as_openai(self) -> dict[str, Any]:
        """The shape chat templates render: {"type": "function", "function": {...}}."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = dict(self.parameters)
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass(frozen=True)
class ToolAnswer:
    """An answer to a request with tools: text and the calls the model made."""

    content: str
    tool_calls: list[ToolCall]

    def message(self) -> dict[str, Any]:
        """The assistant turn to append to the messages before the tool results."""
        return {"role": "assistant", "content": self.content, "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in self.tool_calls]}


def json_depth(value: Any, stop: int) -> int:
    """Nesting depth of parsed JSON, iteratively (no RecursionError), giving up once `stop` is reached."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (Mapping, list, tuple)):
            deepest = max(deepest, depth)
            if deepest >= stop:
                return deepest
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, Mapping) else item))
    return deepest


def check_tool_calls(calls: Any, where: str) -> None:
    """An assistant turn's `tool_calls` as chat templates read them ([{"function": {"name": str,
    "arguments": JSON text or object}}, ...]), or ToolError naming the field: a wrong shape would
    otherwise surface from inside the template as a Jinja error."""
    shape = "a list of {'type': 'function', 'function': {'name': ..., 'arguments': ...}}"
    if not isinstance(calls, (list, tuple)):
        raise ToolError(f"{where} must be {shape}, got {type(calls).__name__}", where)
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(call, Mapping):
            raise ToolError(f"{where}[{j}] must be an object, got {type(call).__name__}", f"{where}[{j}]")
        if not isinstance(function, Mapping):
            raise ToolError(f"{where}[{j}].function must be {{'name': ..., 'arguments': ...}}, got "
                            f"{type(function).__name__}", f"{where}[{j}].function")
        if not isinstance(function.get("name"), str):
            raise ToolError(f"{where}[{j}].function.name must be a string", f"{where}[{j}].function.name")
        if not isinstance(function.get("arguments", "{}"), (str, Mapping)):
            raise ToolError(f"{where}[{j}].function.arguments must be JSON text or an object",
                            f"{where}[{j}].function.arguments")


def parse_tools(tools: Sequence[Any]) -> list[Tool]:
    """OpenAI `tools` -> Tool list; names unique and valid, schemas usable for a grammar."""
    if not isinstance(tools, (list, tuple)):
        raise ToolError(f"tools must be a list of {{'type': 'function', 'function': {{...}}}} entries, "
                        f"got {type(tools).__name__}")
    out: list[Tool] = []
    for i, entry in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(entry, Mapping) or entry.get("type", "function") != "function":
            raise ToolError(f"{where}: only {{'type': 'function', 'function': {{...}}}} tools are supported")
        function = entry.get("function")
        if not isinstance(function, Mapping):
            raise ToolError(f"{where}.function must be an object with 'name' and 'parameters'")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ToolError(f"{where}.function.name must be 1-64 letters, digits, '_', '-' or '.', got {name!r}")
        if any(t.name == name for t in out):
            raise ToolError(f"{where}.function.name {name!r} is used by another tool")
        parameters = function.get("parameters")
        parameters = {"type": "object", "properties": {}} if parameters is None else parameters
        if not isinstance(parameters, Mapping):
            raise ToolError(f"{where}.function.parameters must be a JSON schema object")
        if json_depth(parameters, MAX_JSON_DEPTH + 1) > MAX_JSON_DEPTH:
            raise ToolError(f"{where}.function.parameters nests deeper than {MAX_JSON_DEPTH} levels; "
                            "flatten the schema (or use $defs and $ref)")
        check_schema(parameters, f"{where}.function.parameters")
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise ToolError(f"{where}.function.description must be a string")
        out.append(Tool(name, parameters, description))
    return out


@dataclass(frozen=True)
class ToolPlan:
    """What a request asks of function calling: the tools the prompt lists and how calls are made.

    choice "none": no tools in the prompt, no parsing; "auto": the model may call; "required"
    or a function name: a grammar forces a call whose arguments match the tool's schema.
    """

    tools: tuple[Tool, ...] = ()
    choice: str = "none"
    parallel: bool = True

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def grammar(self) -> str | None:
        if not self.active or self.choice == "auto":
            return None
        chosen = [t for t in self.tools if self.choice in ("required", t.name)]
        return call_grammar(chosen, parallel=self.parallel and self.choice == "required")

    def template_tools(self) -> list[dict[str, Any]] | None:
        return [t.as_openai() for t in self.tools] if self.active else None


def plan_tools(tools: Sequence[Any] | None, choice: Any = None, parallel: bool = True) -> ToolPlan:
    """OpenAI `tools` + `tool_choice` ("none" | "auto" | "required" | {"type": "function",
    "function": {"name": ...}} | a bare name) -> ToolPlan, or ToolError naming the field."""
    parsed = tuple(parse_tools(tools or []))
    if isinstance(choice, Mapping):
        function = choice.get("function")
        choice = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(choice, str):
            raise ToolError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', "
                            "'function': {'name': ...}}", "tool_choice")
    elif choice is None:
        choice = "auto" if parsed else "none"
    if choice == "required" and not parsed:
        raise ToolError("tool_choice 'required' needs at least one entry in tools", "tool_choice")
    if choice not in ("none", "auto", "required") and not any(t.name == choice for t in parsed):
        raise ToolError(f"tool_choice names {choice!r}, which is not among the tools "
                        f"({', '.join(t.name for t in parsed) or 'none given'})", "tool_choice")
    return ToolPlan(parsed, choice, parallel)


def check_schema(schema: Mapping[str, Any], where: str) -> None:
    """A schema the validator and the grammar builder both accept, or ToolError saying why."""
    try:
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError
    except ImportError:  # optional: the grammar builder below still catches most problems
        pass
    else:
        try:
            Draft202012Validator.check_schema(dict(schema))
        except SchemaError as exc:
            raise ToolError(f"{where} is not a valid JSON schema: {exc.message}") from None
    try:
        _converter_with(schema, "probe")
    except Exception as exc:  # the converter raises bare Exceptions and KeyErrors
        raise ToolError(f"{where}: cannot build a grammar from this schema: {type(exc).__name__}: {exc}") from None


def _converter_with(schema: Mapping[str, Any], rule: str) -> tuple[SchemaConverter, str]:
    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "tool")
    return converter, converter.visit(resolved, rule)


def call_grammar(tools: Sequence[Tool], parallel: bool = False) -> str:
    """GBNF for one (or, with `parallel`, several) `<tool_call>` block of the given tools,
    each with arguments that satisfy the tool's schema: the JSON always parses."""
    if not tools:
        raise ToolError("a forced tool call needs at least one tool")
    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    alternatives = []
    for i, tool in enumerate(tools):
        schema = converter.resolve_refs(json.loads(json.dumps(dict(tool.parameters))), f"tool{i}")
        args_rule = converter.visit(schema, f"tool{i}-args")
        head = json.dumps(f'{CALL_OPEN}\n{{"name": {json.dumps(tool.name)}, "arguments": ')
        tail = json.dumps(f"}}\n{CALL_CLOSE}")
        alternatives.append(converter._add_rule(f"tool{i}-call", f"{head} {args_rule} {tail}"))
    converter._add_rule("call", " | ".join(alternatives))
    converter._add_rule("root", 'call ("\\n" call)*' if parallel else "call")
    return converter.format_grammar()


def parse_calls(text: str, cut: bool = False) -> tuple[str, list[ToolCall]]:
    """Whole generated text -> (content outside the calls, calls). Blocks that are not valid
    calls stay in the content, so nothing the model wrote is lost. With `cut` (the length
    limit ended the answer) an unclosed last block is the call it was writing: its name and
    the arguments so far (see `cut_call`), not markup in the content."""
    calls: list[ToolCall] = []
    content: list[str] = []
    pos = 0
    for match in _BLOCK.finditer(text):
        call = _call_from(match.group(1))
        content.append(text[pos:match.start()] if call else text[pos:match.end()])
        if call:
            calls.append(call)
        pos = match.end()
    rest = text[pos:]
    start = rest.find(CALL_OPEN)
    if start >= 0 and (call := _unclosed_call(rest[start + len(CALL_OPEN):], cut)) is not None:
        calls.append(call)  # an unclosed last block (the length limit) that still parses, or was cut
        rest = rest[:start]
    content.append(rest)
    return "".join(content).strip() if calls else "".join(content), calls


def _unclosed_call(body: str, cut: bool) -> ToolCall | None:
    body = body[: len(body) - _partial_suffix(body, CALL_CLOSE)]  # "</tool_" the limit cut
    call = _call_from(body)
    return call if call is not None or not cut else cut_call(body)


# The head of a call block as the family writes it: {"name": "...", "arguments": ...
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"(?P<name>(?:[^"\\]|\\.)*)(?:"\s*(?P<args>,\s*"(?:arguments|parameters)"\s*:\s*)?)?',
                   re.DOTALL)


def cut_call(body: str) -> ToolCall | None:
    """The call a length limit cut inside its block: the name as far as it got and the arguments'
    JSON text so far ("" before they start), as OpenAI reports a call cut by max_tokens
    (finish_reason "length"). None when the block does not start like a call."""
    head = _HEAD.match(body)
    if head is None:
        squeezed = re.sub(r"\s+", "", body)
        return ToolCall("", "") if '{"name":"'.startswith(squeezed) else None
    name = head.group("name")
    try:
        name = json.loads(f'"{name}"')
    except ValueError:  # cut inside an escape sequence
        name = json.loads(f'"{name[:name.rfind(chr(92))]}"')
    return ToolCall(name, body[head.end():].rstrip() if head.group("args") else "")


def _call_from(body: str) -> ToolCall | None:
    try:
        data = json.loads(body.strip())
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(data["name"], text)


class ToolCallStream:
    """Streaming parse_calls: feed() text pieces, get content text and finished calls in order.

    Text that may be the start of `<tool_call>` is held back until the next piece
    decides; a block's JSON is parsed when `</tool_call>` arrives.
    """

    def __init__(self) -> None:
        self._buf = ""
        self._inside = False
        self.calls = 0

    def feed(self, piece: str) -> list[str | ToolCall]:
        self._buf += piece
        out: list[str | ToolCall] = []
        while True:
            if self._inside:
                end = self._buf.find(CALL_CLOSE)
                if end < 0:
                    return out
                body, self._buf = self._buf[:end], self._buf[end + len(CALL_CLOSE):]
                self._inside = False
                call = _call_from(body)
                out.append(call if call is not None else CALL_OPEN + body + CALL_CLOSE)
                self.calls += call is not None
                continue
            start = self._buf.find(CALL_OPEN)
            if start >= 0:
                if start:
                    out.append(self._buf[:start])
                self._buf, self._inside = self._buf[start + len(CALL_OPEN):], True
                continue
            keep = _partial_suffix(self._buf, CALL_OPEN)
            if len(self._buf) > keep:
                out.append(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
            return out

    def finish(self, cut: bool = False) -> list[str | ToolCall]:
        """The end of the stream: an unclosed block is a call if its JSON parses (or, with `cut`,
        the call the length limit cut: `cut_call`), else text."""
        rest, self._buf = self._buf, ""
        if not self._inside:
            return [rest] if rest else []
        self._inside = False
        call = _unclosed_call(rest, cut)
        self.calls += call is not None
        return [call] if call is not None else [CALL_OPEN + rest]


def _partial_suffix(buf: str, tag: str) -> int:
    for n in range(min(len(tag) - 1, len(buf)), 0, -1):
        if buf.endswith(tag[:n]):
            return n
    return 0


def uses_tools(messages: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a conversation holds tool calls or tool results (they need a template that knows them)."""
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def template_supports_tools(source: str) -> bool:
    """Whether a chat template renders `tools` itself (Qwen3-VL's does; minimal ones do not)."""
    return "tools" in source and CALL_OPEN in source


def template_supports_videos(source: str) -> bool:
    """Whether a chat template renders a video part (Qwen3-VL's does; a GGUF's minimal one may not)."""
    return not FORMAT.video_pad or FORMAT.video_pad in source


def template_for(template: ChatTemplate, *, tools: bool = False, videos: bool = False) -> ChatTemplate:
    """The template a conversation renders with: the model's own when it renders the tools and videos
    the conversation carries, else the family's (the format the model was trained on, which renders
    both; a Thinking model's still opens its reasoning)."""
    if (not tools or template_supports_tools(template.source)) and (not videos or template_supports_videos(template.source)):
        return template
    source = FORMAT.thinking_tools_template if template.thinking and FORMAT.thinking_tools_template else TOOLS_TEMPLATE
    return ChatTemplate(source, bos_token=template.bos_token, eos_token=template.eos_token)


def tools_template_for(template: ChatTemplate) -> ChatTemplate:
    """The template for a conversation with tools (see `template_for`)."""
    return template_for(template, tools=True)
