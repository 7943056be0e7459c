"""Tool calls through edge-serve with the official openai client: a named or required function
always comes back as a tool_calls entry whose arguments satisfy the tool's JSON schema."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from edge_models.qwen3vl.synthetic import SyntheticSpec
from support.server import ServerProcess
from edge_runtime.server.prompting import PromptFormat, render_prompt
from edge_runtime.core.template import ChatTemplate
from edge_runtime.chat.tool_calls import ToolCall, ToolCallStream, parse_calls

SPEC = SyntheticSpec(tied=False, seed=3)
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                                             "days": {"type": "integer"}, "metric": {"type": "boolean"}},
           "required": ["city", "days", "metric"], "additionalProperties": False}
ZOOM = {"type": "object", "properties": {"box": {"type": "array", "items": {"type": "integer"}, "minItems": 4,
                                                 "maxItems": 4},
                                         "label": {"type": "string", "enum": ["cat", "dog"]}},
        "required": ["box", "label"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "zoom_in", "description": "Crop the image", "parameters": ZOOM}}]
SCHEMAS = {"get_weather": WEATHER, "zoom_in": ZOOM}
MESSAGES = [{"role": "user", "content": "what is the weather in Paris"}]


@pytest.fixture(scope="module")
def server(artifacts):
    args = ["--parallel", "2", "--ctx-size", "4096", "--threads", "1"]
    with ServerProcess(artifacts.converted(SPEC, "f16"), args) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=120)


def check_call(name: str, arguments: str, expected: str) -> None:
    assert name == expected
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])  # an independent validator


@pytest.mark.parametrize("name", ["get_weather", "zoom_in"])
def test_named_function_without_streaming(client, name):
    resp = client.chat.completions.create(model="any", messages=MESSAGES, tools=TOOLS, max_tokens=160,
                                          tool_choice={"type": "function", "function": {"name": name}}, seed=1)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    check_call(call.function.name, call.function.arguments, name)


@pytest.mark.parametrize("name", ["get_weather", "zoom_in"])
def test_named_function_streaming(client, name):
    stream = client.chat.completions.create(model="any", messages=MESSAGES, tools=TOOLS, max_tokens=160, seed=2,
                                            tool_choice={"type": "function", "function": {"name": name}},
                                            stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for part in delta.tool_calls or []:  # accumulated as OpenAI's own SDK helpers do
            entry = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = part.id or entry["id"]
            if part.function is not None:
                entry["name"] += part.function.name or ""
                entry["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["id"].startswith("call_")
    check_call(calls[0]["name"], calls[0]["arguments"], name)


def test_required_calls_one_of_the_tools_and_results_are_fed_back(client):
    resp = client.chat.completions.create(model="any", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                          max_tokens=300, seed=3, parallel_tool_calls=False)
    call = resp.choices[0].message.tool_calls[0]
    check_call(call.function.name, call.function.arguments, call.function.name)
    follow = MESSAGES + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                         {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    answer = client.chat.completions.create(model="any", messages=follow, tools=TOOLS, max_tokens=8, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the same tools, plus the call and its result: a longer prompt
    assert answer.usage.prompt_tokens > resp.usage.prompt_tokens + 10


def streamed_call(stream) -> tuple[dict, str | None, str]:
    """The first call of a streamed answer (accumulated as OpenAI's SDK helpers do), the finish reason
    and the content."""
    call = {"name": "", "arguments": ""}
    finish, content = None, ""
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or []:
            if part.index == 0 and part.function is not None:
                call["name"] += part.function.name or ""
                call["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return call, finish, content


@pytest.mark.parametrize("stream", [False, True])
def test_forced_call_cut_by_max_tokens_is_a_tool_call_with_the_arguments_so_far(client, stream):
    """Issue 25: the length limit inside <tool_call> gives tool_calls (name, arguments so far) and
    finish_reason "length", not markup in the content. The expected text is the uncut answer's."""
    ask = dict(model="any", messages=MESSAGES, tools=TOOLS, temperature=0, seed=5,
               tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(max_tokens=160, **ask)
    assert whole.choices[0].finish_reason == "tool_calls"
    full_args = json.dumps(json.loads(whole.choices[0].message.tool_calls[0].function.arguments),
                           separators=(",", ":"))
    cut = whole.usage.completion_tokens - 6  # "}}", "\n", "</tool_call>", end of turn: inside the arguments
    if stream:
        call, finish, content = streamed_call(client.chat.completions.create(max_tokens=cut, stream=True, **ask))
    else:
        resp = client.chat.completions.create(max_tokens=cut, **ask)
        finish, content = resp.choices[0].finish_reason, resp.choices[0].message.content
        (made,) = resp.choices[0].message.tool_calls
        call = {"name": made.function.name, "arguments": made.function.arguments}
    assert finish == "length" and not content
    assert call["name"] == "get_weather"
    so_far = "".join(call["arguments"].split())  # the model's spacing; the full text is compact JSON
    assert so_far and full_args.startswith(so_far) and so_far != full_args


@pytest.mark.parametrize("tools, choice, param", [
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                     "properties": {"a": {"type": "nonsense"}}}}}],
     "auto", "tools"),
    ([{"type": "function", "function": {"name": "bad name!", "parameters": WEATHER}}], "auto", "tools"),
    (TOOLS + TOOLS[:1], "auto", "tools"),
    (TOOLS, {"type": "function", "function": {"name": "missing"}}, "tool_choice"),
    (None, "required", "tool_choice"),
])
def test_invalid_tools_are_400(server, tools, choice, param):
    body = {"model": "any", "messages": MESSAGES, "tool_choice": choice, **({"tools": tools} if tools else {})}
    resp = httpx.post(server.url("/v1/chat/completions"), json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


# ---------------------------------------------------------------- the format, without a model

# Qwen3-VL's chat template (tokenizer_config.json of Qwen/Qwen3-VL-2B-Instruct) renders exactly this.
EXPECTED_PROMPT = (
    "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}\n</tools>\n\n'
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n"
    "<|im_start|>user\nhi<|im_end|>\n"
    '<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n"
)


def test_tools_render_in_qwen_format_when_the_gguf_template_has_none():
    minimal = ChatTemplate("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    fmt = PromptFormat(minimal, "<__media__>", False, "tiny")
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert render_prompt(fmt, messages, lambda *_: None, lambda *_: None, tools).text == EXPECTED_PROMPT


@pytest.mark.parametrize("text, content, calls", [
    ("plain answer", "plain answer", []),
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', "", [("f", '{"a": 1}')]),
    ('Let me check.\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\n'
     '{"name": "g", "arguments": {"b": "x"}}\n</tool_call>', "Let me check.", [("f", "{}"), ("g", '{"b": "x"}')]),
    ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    ('<tool_call>\n{"name": "f", "arguments": {"a": 2}}', "", [("f", '{"a": 2}')]),  # cut by max_tokens
])
def test_calls_parse_the_same_whole_and_streamed(text, content, calls):
    whole_content, whole_calls = parse_calls(text)
    assert whole_content == content and [(c.name, c.arguments) for c in whole_calls] == calls
    for size in (1, 3, 7):
        stream = ToolCallStream()
        items = [i for k in range(0, len(text), size) for i in stream.feed(text[k:k + size])] + stream.finish()
        streamed = [(i.name, i.arguments) for i in items if isinstance(i, ToolCall)]
        shown = "".join(i for i in items if isinstance(i, str))
        assert streamed == calls
        assert shown.strip() == content


def test_visionchat_tools_give_the_same_call_as_the_server(client, artifacts):
    from edge_runtime import VisionChat

    choice = {"type": "function", "function": {"name": "zoom_in"}}
    served = client.chat.completions.create(model="any", messages=MESSAGES, tools=TOOLS, tool_choice=choice,
                                            max_tokens=160, temperature=0).choices[0].message.tool_calls[0]
    with VisionChat.from_dir(artifacts.converted(SPEC, "f16"), n_ctx=2048, threads=1) as chat:
        answer = chat.generate(MESSAGES, tools=TOOLS, tool_choice=choice, max_tokens=160, temperature=0)
        assert [(c.name, c.arguments) for c in answer.tool_calls] == [(served.function.name,
                                                                       served.function.arguments)]
        check_call(answer.tool_calls[0].name, answer.tool_calls[0].arguments, "zoom_in")
        follow = MESSAGES + [answer.message(), {"role": "tool", "content": "a cat"}]
        assert isinstance(chat.generate(follow, max_tokens=4, temperature=0), str)
