"""Tool calls through edge-serve with the official openai client: a named or required function
always comes back as a tool_calls entry whose arguments satisfy the tool's JSON schema."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from edge_models.qwen3vl.synthetic import SyntheticSpec
from support.server import ServerProcess
from edge_runtime.server.prompting import PromptFormat, render_prompt
from edge_runtime.template import ChatTemplate
from edge_runtime.tool_calls import ToolCall, ToolCallStream, parse_calls

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
    args = ["--parallel", "2", "--ctx-size", "2048", "--threads", "1"]
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

# The real chat template of Qwen3-VL Instruct checkpoints (chat_template.json of Qwen/Qwen3-VL-2B-Instruct;
# the same text ships with the 4B/8B Instruct ones), rendered by transformers' own renderer: the prompt
# the model was trained on. Nothing of the expected text is written here or taken from our code.
REAL_TEMPLATE = (Path(__file__).parent / "data" / "qwen3-vl-instruct.chat_template.jinja").read_text()
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
CONVERSATIONS = {
    "call and result": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
                        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
    "system, text before two calls, two results": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "both"}]},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            CALL, {"id": "c2", "type": "function", "function": {"name": "g", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "cold"}]},
        {"role": "assistant", "content": "Sunny and cold."}, {"role": "user", "content": "thanks"}],
}
TOOLS_F_G = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "g", "description": "Météo", "parameters": {
                 "type": "object", "properties": {"city": {"type": "string"}}}}}]
# What a GGUF may carry: the real template, or one without tool support (then the family's is used).
GGUF_TEMPLATES = {
    "real": REAL_TEMPLATE,
    "no tool support": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
}


def transformers_prompt(messages: list[dict], tools: list[dict]) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], tools=tools, chat_template=REAL_TEMPLATE,
                                        add_generation_prompt=True)
    return rendered[0]


@pytest.mark.parametrize("gguf_template", list(GGUF_TEMPLATES))
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_tools_render_as_the_real_qwen3_vl_template_does(gguf_template, conversation):
    messages = CONVERSATIONS[conversation]
    fmt = PromptFormat(ChatTemplate(GGUF_TEMPLATES[gguf_template]), "<__media__>", False, "tiny")
    ours = render_prompt(fmt, messages, lambda *_: None, lambda *_: None, TOOLS_F_G).text
    assert ours == transformers_prompt(messages, TOOLS_F_G)


def test_the_reference_rendering_has_qwens_tool_format():
    """The reference itself, read once: the tool list, a call and a result as Qwen writes them."""
    text = transformers_prompt(CONVERSATIONS["call and result"], TOOLS_F_G[:1])
    assert text.startswith("<|im_start|>system\n# Tools\n") and text.endswith("<|im_start|>assistant\n")
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call><|im_end|>' in text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>" in text


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
