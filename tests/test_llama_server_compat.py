"""llama.cpp's own server tests, run against edge-serve: the peer suite.

Upstream: tools/server/tests/unit/{test_basic, test_chat_completion, test_vision_api,
test_tool_call, test_security}.py of the llama.cpp that llama-cpp-python 0.3.36 vendors
(`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`). Their cases are
mirrored here, table-driven, each test naming the upstream tests it mirrors (`@mirrors`),
instead of fetched and run through a shim: upstream's `ServerPreset` downloads its models
(tinyllama2, tinygemma3) from the Hugging Face hub and asserts their exact words and token
counts, the sdist is 76 MB, and CI must stay fast and offline; the project does not commit
fetched code either. What each case asserts is upstream's (status codes, response shape,
grammar-forced text); what needs upstream's model (its words, its tokenizer's counts) is
dropped and the test listed as content-dependent in PEER_SUITE, as are llama-server-only
endpoints and flags (not applicable) and the features edge-serve still refuses (pending).

    python tests/test_llama_server_compat.py   # runs this module, prints the peer-suite table
"""
from __future__ import annotations

import base64
import io
import json
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import httpx
import openai
import pytest

from edge_models.qwen3vl.synthetic import SyntheticSpec
from support.logprobs import LOGPROB_TOL, assert_logprobs_match, reference_logprobs
from support.server import ServerProcess

SPEC = SyntheticSpec(tied=False, seed=3)
MODEL_ALIAS = "llama-test-model"
API_KEY = "sk-this-is-the-secret-key"  # upstream's TEST_API_KEY
CORS_ORIGIN = "http://web.mydomain.fr"
BOOK = [{"role": "system", "content": "Book"}, {"role": "user", "content": "What is the best book"}]
WRITE = [{"role": "system", "content": "You are a coding assistant."}, {"role": "user", "content": "Write an example"}]

# Upstream test (file::function) -> what happens to it here.
RUN, CONTENT, NA, PENDING = "run", "content-dependent", "not applicable", "pending (refused with 400)"
PEER_SUITE: dict[str, tuple[str, str]] = {
    # test_basic.py
    "test_basic::test_server_start_simple": (RUN, "/health and /v1/health"),
    "test_basic::test_server_multiple_addresses": (NA, "--host with several addresses; /v1/completions"),
    "test_basic::test_server_props": (NA, "/props is llama-server's"),
    "test_basic::test_server_models": (RUN, "/models without /v1; id is --model-id"),
    "test_basic::test_server_slots": (NA, "/slots is llama-server's"),
    "test_basic::test_load_split_model": (NA, "split GGUF from the hub, /completion"),
    "test_basic::test_no_ui": (RUN, "the page at /; --no-ui is llama-server's flag"),
    "test_basic::test_server_model_aliases_and_tags": (NA, "--alias lists and --tags"),
    # test_chat_completion.py
    "test_chat_completion::test_chat_completion": (
        RUN, "shape, usage, fingerprint; the words and n_prompt are tinyllama's (content-dependent), "
             "--chat-template/--jinja rows are llama-server flags"),
    "test_chat_completion::test_chat_completion_cached_tokens": (
        RUN, "ordering of cached counts; exact counts are tinyllama's tokenizer"),
    "test_chat_completion::test_chat_completion_stream": (RUN, "first delta content is \"\" as OpenAI's, not null"),
    "test_chat_completion::test_chat_completion_with_openai_library": (RUN, "the words are tinyllama's"),
    "test_chat_completion::test_chat_template": (NA, "--chat-template and the __verbose debug field"),
    "test_chat_completion::test_chat_template_assistant_prefill": (NA, "__verbose debug field"),
    "test_chat_completion::test_chat_template_continue_final_message_vllm_compat": (NA, "__verbose debug field"),
    "test_chat_completion::test_chat_template_continue_final_message_mutual_exclusion": (
        RUN, "400: the two fields are refused as unsupported"),
    "test_chat_completion::test_apply_chat_template": (NA, "/apply-template is llama-server's"),
    "test_chat_completion::test_completion_with_response_format": (RUN, "the [ -3000 ] row checks the schema only"),
    "test_chat_completion::test_completion_with_json_schema": (RUN, "the jinja rows are one case here"),
    "test_chat_completion::test_completion_with_grammar": (RUN, "the jinja rows are one case here"),
    "test_chat_completion::test_completion_with_invalid_grammar": (RUN, "and the 400 names grammar"),
    "test_chat_completion::test_invalid_chat_completion_req": (
        RUN, "the two-trailing-assistant row is accepted, as OpenAI does (llama-server's prefill rule)"),
    "test_chat_completion::test_chat_completion_with_timings_per_token": (NA, "timings_per_token: refused with 400"),
    "test_chat_completion::test_logprobs": (RUN, "top_logprobs 3; values checked against a separate decode"),
    "test_chat_completion::test_logprobs_stream": (RUN, "top_logprobs 3; values checked against a separate decode"),
    "test_chat_completion::test_logit_bias": (NA, "needs /tokenize; logit_bias: tests/test_server.py"),
    "test_chat_completion::test_context_size_exceeded": (RUN, "error is OpenAI's context_length_exceeded"),
    "test_chat_completion::test_context_size_exceeded_stream": (RUN, "error is OpenAI's context_length_exceeded"),
    "test_chat_completion::test_return_progress": (NA, "return_progress: refused with 400"),
    "test_chat_completion::test_chat_completions_multiple_choices": (
        RUN, "on a two-slot server (n > --parallel is refused); id_slot is refused"),
    "test_chat_completion::test_chat_completions_token_count": (NA, "/chat/completions/input_tokens"),
    "test_chat_completion::test_verbose_debug": (NA, "verbose: refused with 400"),
    # test_vision_api.py
    "test_vision_api::test_models_supports_multimodal_capability": (NA, "Ollama-style models[].capabilities"),
    "test_vision_api::test_v1_models_supports_multimodal_capability": (NA, "Ollama-style models[].capabilities"),
    "test_vision_api::test_vision_chat_completion": (
        RUN, "status per image source; the CIFAR labels are tinygemma3's (content-dependent); "
             "remote URLs are refused by default (no network)"),
    "test_vision_api::test_vision_chat_completion_token_count": (NA, "/chat/completions/input_tokens"),
    "test_vision_api::test_vision_completion": (NA, "/completions with multimodal_data"),
    "test_vision_api::test_vision_embeddings": (NA, "/embeddings"),
    "test_vision_api::test_vision_embeddings_oai_content": (NA, "/v1/embeddings"),
    # test_tool_call.py
    "test_tool_call::test_completion_with_required_tool_real_model": (
        RUN, "TEST_TOOL rows (the grammar forces them); free-text PYTHON/WEATHER arguments need a real model"),
    "test_tool_call::test_completion_without_tool_call_fast": (
        RUN, "[] and tool_choice none rows; the auto row is the model's choice (content-dependent)"),
    "test_tool_call::test_completion_without_tool_call_slow": (NA, "the same cases under other models' templates"),
    "test_tool_call::test_weather": (CONTENT, "a real model's knowledge"),
    "test_tool_call::test_calc_result": (CONTENT, "a real model's knowledge"),
    "test_tool_call::test_thoughts": (CONTENT, "a real model's reasoning (tests/test_thinking.py: reasoning_content)"),
    "test_tool_call::test_hello_world": (CONTENT, "a real model's code"),
    # test_security.py
    "test_security::test_access_public_endpoint": (RUN, ""),
    "test_security::test_access_static_assets_without_api_key": (RUN, "/ only; the other paths are llama-server's UI"),
    "test_security::test_incorrect_api_key": (RUN, "on /chat/completions (edge-serve has no /completions)"),
    "test_security::test_correct_api_key": (RUN, "on /chat/completions (edge-serve has no /completions)"),
    "test_security::test_correct_api_key_anthropic_header": (NA, "X-Api-Key belongs to the Anthropic API"),
    "test_security::test_openai_library_correct_api_key": (RUN, "base URL without /v1"),
    "test_security::test_cors_options": (RUN, "with the origin listed (--cors-origin); unlisted ones are refused"),
    "test_security::test_cors_origins_localhost_reflects": (NA, "router mode's --cors-origins localhost keyword"),
    "test_security::test_cors_origins_localhost_rejects": (RUN, "403 without CORS headers"),
    "test_security::test_cors_origins_defaults_to_localhost_with_tools_enabled": (NA, "server-side tools"),
    "test_security::test_cors_proxy_only_forwards_explicit_proxy_headers": (NA, "/cors-proxy"),
    "test_security::test_local_media_file": (
        RUN, "file:///ABSOLUTE paths inside --allow-local-dir (llama-server: file://RELATIVE under --media-path)"),
}


def mirrors(*upstream: str) -> Callable[[Callable], Callable]:
    """Tags a test with the upstream tests it mirrors (keys of PEER_SUITE)."""
    def tag(fn: Callable) -> Callable:
        fn.upstream = upstream  # type: ignore[attr-defined]
        return fn
    return tag


# ---------------------------------------------------------------- servers and requests


@pytest.fixture(scope="module")
def model_dir(artifacts):
    return artifacts.converted(SPEC, "f16")


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory, test_image):
    root = tmp_path_factory.mktemp("media")
    (root / "mtmd").mkdir()
    test_image.save(root / "mtmd" / "test-1.png")
    test_image.save(root / "outside.png")
    return root / "mtmd"


@pytest.fixture(scope="module")
def server(model_dir, media_dir):
    """Upstream's tinyllama2 preset, as edge-serve: one slot, no key."""
    args = ["--parallel", "1", "--ctx-size", "1024", "--threads", "1", "--model-id", MODEL_ALIAS,
            "--allow-local-dir", str(media_dir)]
    with ServerProcess(model_dir, args) as proc:
        yield proc


@pytest.fixture(scope="module")
def secure(model_dir):
    """test_security's server: an API key, and one listed CORS origin."""
    args = ["--parallel", "1", "--ctx-size", "1024", "--threads", "1", "--cors-origin", CORS_ORIGIN]
    with ServerProcess(model_dir, args, env={"EDGE_API_KEY": API_KEY}) as proc:
        yield proc


def send(server: ServerProcess, method: str, path: str, data: Any = None, headers: dict | None = None):
    return httpx.request(method, server.url(path), json=data, headers=headers, timeout=120)


def stream_events(server: ServerProcess, path: str, data: dict) -> list[dict]:
    """The JSON of each SSE `data:` line up to [DONE] (upstream's make_stream_request)."""
    events = []
    with httpx.stream("POST", server.url(path), json=data, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def any_request(server: ServerProcess, data: dict) -> dict:
    """upstream's make_any_request: a streamed answer merged into the non-streamed shape."""
    if not data.get("stream"):
        resp = send(server, "POST", "/v1/chat/completions", data)
        assert resp.status_code == 200, resp.text
        return resp.json()
    message: dict[str, Any] = {"role": "assistant", "content": None}
    calls: dict[int, dict] = {}
    finish = None
    for event in stream_events(server, "/v1/chat/completions", data):
        for choice in event["choices"]:
            delta = choice["delta"]
            if delta.get("content"):
                message["content"] = (message["content"] or "") + delta["content"]
            for part in delta.get("tool_calls") or []:
                call = calls.setdefault(part["index"], {"id": None, "type": "function",
                                                         "function": {"name": "", "arguments": ""}})
                call["id"] = part.get("id") or call["id"]
                call["function"]["name"] += part.get("function", {}).get("name") or ""
                call["function"]["arguments"] += part.get("function", {}).get("arguments") or ""
            finish = choice["finish_reason"] or finish
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return {"choices": [{"message": message, "finish_reason": finish}]}


def assert_refused(resp: httpx.Response, param: str | None = None) -> dict:
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def png_data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ---------------------------------------------------------------- test_basic.py


@mirrors("test_basic::test_server_start_simple", "test_security::test_access_public_endpoint")
@pytest.mark.parametrize("path", ["/health", "/v1/health"])
def test_health(secure, path):
    res = send(secure, "GET", path)  # no key: /health is open
    assert res.status_code == 200
    assert "error" not in res.json()


@mirrors("test_basic::test_server_models")
@pytest.mark.parametrize("path", ["/models", "/v1/models"])
def test_models(server, path):
    res = send(server, "GET", path)
    assert res.status_code == 200
    assert len(res.json()["data"]) == 1
    assert res.json()["data"][0]["id"] == MODEL_ALIAS


@mirrors("test_basic::test_no_ui", "test_security::test_access_static_assets_without_api_key")
def test_page_without_key(secure):
    res = send(secure, "GET", "/")
    assert res.status_code == 200
    assert "<!doctype html>" in res.text.lower()


# ---------------------------------------------------------------- test_chat_completion.py


@mirrors("test_chat_completion::test_chat_completion")
@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("user_prompt", [
    "What is the best book",
    [{"type": "text", "text": "What is"}, {"type": "text", "text": "the best book"}],
])
def test_chat_completion(server, path, user_prompt):
    res = send(server, "POST", path, {
        "model": None,
        "max_tokens": 8,
        "messages": [{"role": "system", "content": "Book"}, {"role": "user", "content": user_prompt}],
        "ignore_eos": True,  # a random-weight model may end its turn before 8 tokens; tinyllama does not
    })
    assert res.status_code == 200
    body = res.json()
    assert "cmpl" in body["id"]
    assert body["system_fingerprint"].startswith("b" + metadata.version("llama_cpp_python"))
    assert body["usage"]["completion_tokens"] == 8
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length"


@mirrors("test_chat_completion::test_chat_completion_cached_tokens")
def test_chat_completion_cached_tokens(server):
    def ask(text: str, cache_prompt: bool = True) -> dict:
        res = send(server, "POST", "/chat/completions", {
            "max_tokens": 8, "cache_prompt": cache_prompt,
            "messages": [{"role": "system", "content": "Test"}, {"role": "user", "content": text}]})
        assert res.status_code == 200, res.text
        return res.json()["usage"]

    first = ask("1 2 3 4 5 6", cache_prompt=False)  # the slot served other tests: start from nothing
    again, late, early = ask("1 2 3 4 5 6"), ask("1 2 3 4 5 9"), ask("1 2 3 9 9 9")
    n_prompt = first["prompt_tokens"]
    assert again["prompt_tokens"] == late["prompt_tokens"] == early["prompt_tokens"] == n_prompt
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in (first, again, late, early)]
    # upstream: 0, 76, 51, 47 of 77: all but the last token, then less the earlier the prompts part
    assert cached[0] == 0 and cached[1] == n_prompt - 1
    assert cached[1] > cached[2] > cached[3] > 0
    assert ask("1 2 3 4 5 6", cache_prompt=False)["prompt_tokens_details"]["cached_tokens"] == 0


@mirrors("test_chat_completion::test_chat_completion_stream")
@pytest.mark.parametrize("max_tokens", [8, 32])
def test_chat_completion_stream(server, max_tokens):
    events = stream_events(server, "/chat/completions", {
        "max_tokens": max_tokens, "messages": BOOK, "stream": True, "ignore_eos": True,
        "stream_options": {"include_usage": True}})
    content = ""
    ids = {e["id"] for e in events}
    assert len(ids) == 1 and "cmpl" in ids.pop()  # one id for every event of the stream
    finish = None
    for i, data in enumerate(events):
        assert data["system_fingerprint"].startswith("b")
        assert data["model"] == MODEL_ALIAS
        if not data["choices"]:
            assert data["usage"]["completion_tokens"] == max_tokens
            continue
        choice = data["choices"][0]
        if i == 0:
            assert choice["delta"]["role"] == "assistant"
            assert not choice["delta"]["content"]  # OpenAI sends "", llama-server null
        else:
            assert "role" not in choice["delta"]
        if choice["finish_reason"] in ("stop", "length"):
            assert "content" not in choice["delta"]
            finish = choice["finish_reason"]
        else:
            assert choice["finish_reason"] is None
            content += choice["delta"].get("content") or ""
    assert finish == "length" and content


@mirrors("test_chat_completion::test_chat_completion_with_openai_library")
def test_chat_completion_with_openai_library(server):
    client = openai.OpenAI(api_key="dummy", base_url=server.url("/v1"), max_retries=0)
    res = client.chat.completions.create(model="gpt-3.5-turbo-instruct", messages=BOOK, max_tokens=8, seed=42,
                                         temperature=0.8, extra_body={"ignore_eos": True})
    assert res.system_fingerprint is not None and res.system_fingerprint.startswith("b")
    assert res.choices[0].finish_reason == "length"
    assert res.choices[0].message.content is not None


@mirrors("test_chat_completion::test_chat_template_continue_final_message_mutual_exclusion")
def test_continue_final_message_is_refused(server):
    res = send(server, "POST", "/chat/completions", {
        "max_tokens": 8, "add_generation_prompt": True, "continue_final_message": True,
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
    assert_refused(res, "add_generation_prompt")


@mirrors("test_chat_completion::test_completion_with_response_format")
@pytest.mark.parametrize("response_format,n_predicted,check", [
    ({"type": "json_object", "schema": {"const": "42"}}, 6, lambda c: c.strip() == '"42"'),
    ({"type": "json_object", "schema": {"items": [{"type": "integer"}]}}, 64,  # upstream: tinyllama's "[ -3000 ]"
     lambda c: isinstance(v := json.loads(c), list) and len(v) == 1 and isinstance(v[0], int)),
    ({"type": "json_schema", "json_schema": {"schema": {"const": "foooooo"}}}, 10, lambda c: c.strip() == '"foooooo"'),
    ({"type": "json_object"}, 10, lambda c: c.startswith("{")),
    ({"type": "sound"}, 0, None),
    # invalid response format (expected to fail)
    ({"type": "json_object", "schema": 123}, 0, None),
    ({"type": "json_object", "schema": {"type": 123}}, 0, None),
    ({"type": "json_object", "schema": {"type": "hiccup"}}, 0, None),
])
def test_completion_with_response_format(server, response_format, n_predicted, check):
    res = send(server, "POST", "/chat/completions", {
        "max_tokens": n_predicted or 1, "messages": WRITE, "response_format": response_format})
    if check is None:
        assert res.status_code == 400 and "error" in res.json()
        assert res.json()["error"]["param"].startswith("response_format")
    else:
        assert res.status_code == 200, res.text
        content = res.json()["choices"][0]["message"]["content"]
        assert check(content), content


@mirrors("test_chat_completion::test_completion_with_json_schema")
def test_completion_with_json_schema(server):
    res = send(server, "POST", "/chat/completions", {
        "max_tokens": 6, "messages": WRITE, "json_schema": {"const": "42"}})
    assert res.status_code == 200, res.text
    assert res.json()["choices"][0]["message"]["content"].strip() == '"42"'


@mirrors("test_chat_completion::test_completion_with_grammar")
def test_completion_with_grammar(server):
    res = send(server, "POST", "/chat/completions", {
        "max_tokens": 6, "messages": [{"role": "user", "content": "Does not matter what I say, does it?"}],
        "grammar": 'root ::= "a"{5,5}'})
    assert res.status_code == 200, res.text
    assert res.json()["choices"][0]["message"]["content"] == "aaaaa"


@mirrors("test_chat_completion::test_completion_with_invalid_grammar")
def test_completion_with_invalid_grammar(server):
    res = send(server, "POST", "/chat/completions", {
        "max_tokens": 8, "messages": [{"role": "user", "content": "Does not matter what I say, does it?"}],
        "grammar": "root ::= this is (not valid GBNF"})
    assert "grammar" in assert_refused(res, "grammar")["message"]
    assert send(server, "GET", "/health").status_code == 200  # the refusal left the server serving


@mirrors("test_chat_completion::test_invalid_chat_completion_req")
@pytest.mark.parametrize("messages", [
    None,
    "string",
    [123],
    [{}],
    [{"role": 123}],
    [{"role": "system", "content": 123}],
    [{"role": "system", "content": "test"}, {}],
])
def test_invalid_chat_completion_req(server, messages):
    res = send(server, "POST", "/chat/completions", {"messages": messages})
    assert res.status_code in (400, 500)
    assert "error" in res.json()


@mirrors("test_chat_completion::test_invalid_chat_completion_req")
def test_two_trailing_assistant_messages_are_accepted(server):
    """Upstream's last row expects 400 (llama-server's assistant-prefill rule); OpenAI's API answers it."""
    res = send(server, "POST", "/chat/completions", {"max_tokens": 2, "messages": [
        {"role": "user", "content": "test"}, {"role": "assistant", "content": "test"},
        {"role": "assistant", "content": "test"}]})
    assert res.status_code == 200, res.text


@mirrors("test_chat_completion::test_context_size_exceeded")
def test_context_size_exceeded(server):
    res = send(server, "POST", "/chat/completions", {"messages": BOOK * 100})
    error = assert_refused(res)
    assert error["code"] == "context_length_exceeded"  # OpenAI's; llama-server: type exceed_context_size_error


@mirrors("test_chat_completion::test_context_size_exceeded_stream")
def test_context_size_exceeded_stream(server):
    with httpx.stream("POST", server.url("/chat/completions"), json={"messages": BOOK * 100, "stream": True},
                      timeout=120) as resp:
        assert resp.status_code == 400  # before any event: the HTTP status says it
        assert json.loads(resp.read())["error"]["code"] == "context_length_exceeded"


def openai_logprobs(entries) -> list[dict]:
    """The openai client's parsed ChatCompletionTokenLogprob objects, as plain dicts."""
    return [e.model_dump(exclude_none=True) for e in entries]


@mirrors("test_chat_completion::test_logprobs")
def test_logprobs(server, model_dir):
    """Upstream's checks (tokens join to the content, each with logprob <= 0, bytes and top_logprobs),
    plus every value against a separate decode of the same GGUF; greedy text unchanged by asking."""
    client = openai.OpenAI(api_key="dummy", base_url=server.url("/v1"), max_retries=0)
    res = client.chat.completions.create(model="gpt-3.5-turbo-instruct", temperature=0.0, messages=BOOK,
                                         max_tokens=5, logprobs=True, top_logprobs=3)
    plain = client.chat.completions.create(model="gpt-3.5-turbo-instruct", temperature=0.0, messages=BOOK,
                                           max_tokens=5)
    choice = res.choices[0]
    assert choice.message.content == plain.choices[0].message.content
    assert plain.choices[0].logprobs is None  # not asked: not sent
    content = openai_logprobs(choice.logprobs.content)
    assert len(content) == res.usage.completion_tokens == 5
    assert bytes(b for e in content for b in e["bytes"]).decode("utf-8", "replace") == choice.message.content
    for entry in content:
        assert entry["logprob"] <= 0.0 and len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["logprob"] == entry["logprob"]  # greedy: the likeliest token
    assert_logprobs_match(content, reference_logprobs(model_dir, BOOK, 5, 3))


@mirrors("test_chat_completion::test_logprobs_stream")
def test_logprobs_stream(server, model_dir):
    client = openai.OpenAI(api_key="dummy", base_url=server.url("/v1"), max_retries=0)
    stream = client.chat.completions.create(model="gpt-3.5-turbo-instruct", temperature=0.0, messages=BOOK,
                                            max_tokens=5, logprobs=True, top_logprobs=3, stream=True)
    text, content = "", []
    for chunk in stream:
        choice = chunk.choices[0]
        if choice.delta.content:
            text += choice.delta.content
            assert choice.logprobs is not None  # a content chunk carries its tokens' logprobs
        if choice.logprobs is not None:
            content += openai_logprobs(choice.logprobs.content)
    assert len(content) == 5
    assert bytes(b for e in content for b in e["bytes"]).decode("utf-8", "replace") == text
    assert_logprobs_match(content, reference_logprobs(model_dir, BOOK, 5, 3))


def test_logprobs_see_the_logit_bias(server, model_dir):
    """The logprobs are those of the row the sampler reads: after logit_bias (here lifting the
    runner-up of the first token to first place), before temperature and grammar."""
    first = reference_logprobs(model_dir, BOOK, 1, 2)[0]["top_logprobs"]
    runner_up = first[1]["id"]
    bias = {runner_up: 5.0}
    res = send(server, "POST", "/v1/chat/completions", {
        "messages": BOOK, "max_tokens": 3, "temperature": 0.0, "logprobs": True, "top_logprobs": 2,
        "logit_bias": {str(k): v for k, v in bias.items()}})
    assert res.status_code == 200, res.text
    want = reference_logprobs(model_dir, BOOK, 3, 2, bias)
    assert want[0]["bytes"] == first[1]["bytes"]  # the bias changed the answer
    assert_logprobs_match(res.json()["choices"][0]["logprobs"]["content"], want)


def test_logprobs_do_not_see_temperature_or_top_k(server, model_dir):
    """Sampling at temperature 1.5 among the top 5: the first token's logprobs are still the model's
    (the prompt's row, untouched by the sampler chain), and the sampled token is one of those 5."""
    want = reference_logprobs(model_dir, BOOK, 1, 5)[0]["top_logprobs"]
    res = send(server, "POST", "/v1/chat/completions", {
        "messages": BOOK, "max_tokens": 1, "temperature": 1.5, "top_k": 5, "seed": 11, "logprobs": True,
        "top_logprobs": 5})
    assert res.status_code == 200, res.text
    first = res.json()["choices"][0]["logprobs"]["content"][0]
    assert [t["bytes"] for t in first["top_logprobs"]] == [t["bytes"] for t in want]
    assert [t["logprob"] for t in first["top_logprobs"]] == pytest.approx([t["logprob"] for t in want], abs=LOGPROB_TOL)
    sampled = next(t for t in want if t["bytes"] == first["bytes"])
    assert first["logprob"] == pytest.approx(sampled["logprob"], abs=LOGPROB_TOL)


@pytest.mark.parametrize("extra,param", [({"top_logprobs": 2}, "top_logprobs"),
                                         ({"logprobs": True, "top_logprobs": 21}, "top_logprobs")])
def test_bad_logprobs_are_refused(server, extra, param):
    assert_refused(send(server, "POST", "/chat/completions", {"max_tokens": 2, "messages": BOOK, **extra}), param)


@pytest.fixture(scope="module")
def two_slots(model_dir):
    """A server with two slots: n=2 choices run at once."""
    args = ["--parallel", "2", "--ctx-size", "2048", "--threads", "1", "--model-id", MODEL_ALIAS]
    with ServerProcess(model_dir, args) as proc:
        yield proc


@mirrors("test_chat_completion::test_chat_completions_multiple_choices")
def test_chat_completions_multiple_choices(two_slots, model_dir):
    """Upstream's shape checks; greedy choices are both the greedy answer of a separate decode."""
    res = send(two_slots, "POST", "/chat/completions", {"max_tokens": 8, "n": 2, "messages": BOOK,
                                                        "temperature": 0.0, "ignore_eos": True})
    assert res.status_code == 200, res.text
    body = res.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for choice in body["choices"]:
        assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 16  # both choices' tokens, the prompt counted once
    greedy = send(two_slots, "POST", "/chat/completions", {"max_tokens": 8, "n": 2, "messages": BOOK,
                                                          "temperature": 0.0}).json()
    reference = reference_logprobs(model_dir, BOOK, 8, 0)
    want = bytes(b for e in reference for b in e["bytes"]).decode("utf-8", "replace")
    assert [c["message"]["content"] for c in greedy["choices"]] == [want, want]


def test_choices_have_their_own_seed(two_slots):
    """Choice i samples as a single request seeded seed + i: its own sampler over the shared prompt."""
    def ask(n: int, seed: int) -> list[str]:
        res = send(two_slots, "POST", "/chat/completions", {"max_tokens": 12, "n": n, "messages": BOOK,
                                                            "temperature": 1.5, "top_k": 0, "top_p": 1.0,
                                                            "seed": seed, "ignore_eos": True})
        assert res.status_code == 200, res.text
        return [c["message"]["content"] for c in res.json()["choices"]]
    both = ask(2, 5)
    assert both == ask(1, 5) + ask(1, 6)
    assert both[0] != both[1]


def test_choices_wait_for_their_slots(two_slots):
    """Three n=2 requests at once on two slots: each waits until both slots are free, none is refused."""
    from concurrent.futures import ThreadPoolExecutor
    body = {"max_tokens": 6, "n": 2, "messages": BOOK, "ignore_eos": True, "seed": 3}
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: send(two_slots, "POST", "/chat/completions", body), range(3)))
    for res in answers:
        assert res.status_code == 200, res.text
        assert [c["finish_reason"] for c in res.json()["choices"]] == ["length", "length"]
    assert len({json.dumps([c["message"] for c in r.json()["choices"]]) for r in answers}) == 1  # seeded alike


def test_multiple_choices_stream_with_logprobs(two_slots):
    client = openai.OpenAI(api_key="dummy", base_url=two_slots.url("/v1"), max_retries=0)
    stream = client.chat.completions.create(model=MODEL_ALIAS, messages=BOOK, max_tokens=4, n=2, seed=1,
                                            logprobs=True, top_logprobs=2, stream=True,
                                            stream_options={"include_usage": True})
    text, tokens, finish, usage = ["", ""], [0, 0], [None, None], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text[choice.index] += choice.delta.content or ""
            tokens[choice.index] += len(choice.logprobs.content) if choice.logprobs else 0
            finish[choice.index] = choice.finish_reason or finish[choice.index]
    assert finish[0] is not None and finish[1] is not None
    assert usage is not None and usage.completion_tokens == sum(tokens) > 0


@pytest.mark.parametrize("extra,param", [({"n": 2}, "n"), ({"id_slot": 0}, "id_slot")])
def test_more_choices_than_slots_are_refused(server, extra, param):
    """One slot: n=2 cannot run at once, and is refused; pinning a slot is not offered."""
    assert_refused(send(server, "POST", "/chat/completions", {"max_tokens": 8, "messages": BOOK, **extra}), param)


# ---------------------------------------------------------------- test_vision_api.py


@mirrors("test_vision_api::test_vision_chat_completion")
@pytest.mark.parametrize("image_url,success", [
    ("IMG_BASE64_URI_0", True),
    ("malformed", False),
    ("https://huggingface.co/ggml-org/tinygemma3-GGUF/resolve/main/test/11_truck.png", False),  # remote: off
    ("https://google.com/404", False),  # non-existent image
    ("https://ggml.ai", False),  # non-image data
    ("data:text/html;base64,aGVsbG8=", False),  # unsupported data uri mime
])
def test_vision_chat_completion(server, test_image, image_url, success):
    url = png_data_uri(test_image) if image_url == "IMG_BASE64_URI_0" else image_url
    res = send(server, "POST", "/chat/completions", {
        "temperature": 0.0, "top_k": 1, "max_tokens": 8,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "What is this:\n"},
                                                  {"type": "image_url", "image_url": {"url": url}}]}]})
    if success:
        assert res.status_code == 200, res.text
        assert res.json()["choices"][0]["message"]["role"] == "assistant"
        assert res.json()["usage"]["prompt_tokens_details"]["image_tokens"] > 0
    else:
        assert res.status_code != 200


# ---------------------------------------------------------------- test_tool_call.py

TEST_TOOL = {"type": "function", "function": {"name": "test", "description": "", "parameters": {
    "type": "object", "properties": {"success": {"type": "boolean", "const": True}}, "required": ["success"]}}}
PYTHON_TOOL = {"type": "function", "function": {
    "name": "python", "description": "Runs code in an ipython interpreter and returns the result of the execution "
                                     "after 60 seconds.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string", "description": "The code to run in "
                                                             "the ipython interpreter."}}, "required": ["code"]}}}


@mirrors("test_tool_call::test_completion_with_required_tool_real_model")
@pytest.mark.parametrize("stream", [False, True])
def test_completion_with_required_tool(server, stream):
    body = any_request(server, {"max_tokens": 512, "messages": WRITE, "tool_choice": "required",
                                "tools": [TEST_TOOL], "parallel_tool_calls": False, "stream": stream,
                                "temperature": 0.0, "top_k": 1, "top_p": 1.0})
    choice = body["choices"][0]
    tool_calls = choice["message"].get("tool_calls")
    assert tool_calls and len(tool_calls) == 1, choice["message"]
    assert choice["message"].get("content") in (None, "")
    assert tool_calls[0]["function"]["name"] == "test"
    assert "success" in json.loads(tool_calls[0]["function"]["arguments"])


@mirrors("test_tool_call::test_completion_without_tool_call_fast")
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tools,tool_choice", [([], None), ([PYTHON_TOOL], "none")])
def test_completion_without_tool_call(server, tools, tool_choice, stream):
    body = any_request(server, {"max_tokens": 128, "messages": WRITE, "tools": tools, "tool_choice": tool_choice,
                                "stream": stream, "temperature": 0.0, "top_k": 1, "top_p": 1.0})
    assert body["choices"][0]["message"].get("tool_calls") is None


# ---------------------------------------------------------------- test_security.py


def chat_with(secure, headers: dict) -> httpx.Response:
    return send(secure, "POST", "/chat/completions",
                   {"max_tokens": 4, "messages": [{"role": "user", "content": "I believe the meaning of life is"}]},
                   headers)


@mirrors("test_security::test_incorrect_api_key")
@pytest.mark.parametrize("api_key", [None, "invalid-key"])
def test_incorrect_api_key(secure, api_key):
    res = chat_with(secure, {"Authorization": f"Bearer {api_key}"} if api_key else {})
    assert res.status_code == 401
    assert res.json()["error"]["type"] == "authentication_error"


@mirrors("test_security::test_correct_api_key")
def test_correct_api_key(secure):
    res = chat_with(secure, {"Authorization": f"Bearer {API_KEY}"})
    assert res.status_code == 200
    assert "error" not in res.json()


@mirrors("test_security::test_openai_library_correct_api_key")
def test_openai_library_correct_api_key(secure):
    client = openai.OpenAI(api_key=API_KEY, base_url=secure.base_url, max_retries=0)  # no /v1
    res = client.chat.completions.create(model="gpt-3.5-turbo", max_tokens=8, messages=[
        {"role": "system", "content": "You are a chatbot."}, {"role": "user", "content": "What is the meaning of life?"}])
    assert len(res.choices) == 1


def preflight(secure, origin: str) -> httpx.Response:
    return send(secure, "OPTIONS", "/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "Authorization"})


@mirrors("test_security::test_cors_options")
@pytest.mark.parametrize("header,value", [
    ("Access-Control-Allow-Origin", CORS_ORIGIN),
    ("Access-Control-Allow-Methods", "POST"),
    ("Access-Control-Allow-Headers", "Authorization"),
])
def test_cors_options(secure, header, value):
    res = preflight(secure, CORS_ORIGIN)
    assert res.status_code == 200
    assert value in res.headers[header]


@mirrors("test_security::test_cors_origins_localhost_rejects")
@pytest.mark.parametrize("origin", ["http://evil.com", "http://notlocalhost", "http://localhost.evil.com"])
def test_cors_origins_rejects(secure, origin):
    res = preflight(secure, origin)
    assert "Access-Control-Allow-Origin" not in res.headers


@mirrors("test_security::test_local_media_file")
@pytest.mark.parametrize("which,image_url,success", [
    ("secure", "file://{dir}/test-1.png", False),  # no --allow-local-dir: local files are off
    ("server", "file://{dir}/test-1.png", True),
    ("server", "file://{dir}//test-1.png", True),  # should be the same file as above
    ("server", "file://{dir}/notfound.png", False),  # non-existent file
    ("server", "file://{dir}/../outside.png", False),  # no directory traversal
])
def test_local_media_file(request, media_dir, which, image_url, success):
    target = request.getfixturevalue(which)
    headers = {"Authorization": f"Bearer {API_KEY}"} if which == "secure" else None
    res = send(target, "POST", "/chat/completions", {"max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "test"}, {"type": "image_url", "image_url": {"url": image_url.format(dir=media_dir)}}]}]},
        headers)
    assert res.status_code == (200 if success else 400), res.text


# ---------------------------------------------------------------- llama-server's fields, as edge-serve answers them


def test_openai_client_sends_llama_server_fields(server):
    """The official client's extra_body: a grammar constrains the answer, streamed too; an unknown
    llama.cpp field is refused by name."""
    client = openai.OpenAI(api_key="dummy", base_url=server.url("/v1"), max_retries=0)
    grammar = {"grammar": 'root ::= ("yes" | "no") "!"'}
    res = client.chat.completions.create(model="any", messages=BOOK, max_tokens=8, extra_body=grammar)
    assert res.choices[0].message.content in ("yes!", "no!") and res.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="any", messages=BOOK, max_tokens=8, stream=True, extra_body=grammar)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) in ("yes!", "no!")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="any", messages=BOOK, max_tokens=8, extra_body={"typical_p": 0.9})
    assert info.value.body["param"] == "typical_p" and "llama-server" in info.value.body["message"]


def test_n_predict_is_max_tokens(server):
    for fields, expected in (({"n_predict": 3}, 3), ({"n_predict": 5, "max_tokens": 2}, 5)):
        res = send(server, "POST", "/chat/completions", {"messages": BOOK, "ignore_eos": True, **fields})
        assert res.status_code == 200, res.text
        assert res.json()["usage"]["completion_tokens"] == expected
        assert res.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("field,value", [
    ("timings_per_token", True), ("mirostat", 2), ("reasoning_budget_message", "Enough."),
    ("return_progress", True), ("made_up_field", float("nan")),
])
def test_unknown_fields_are_refused_by_name(server, field, value):
    body = json.dumps({"messages": BOOK, "max_tokens": 2, field: value})  # NaN as JSON's NaN token
    res = httpx.post(server.url("/chat/completions"), content=body, timeout=60,
                     headers={"Content-Type": "application/json"})
    assert field in assert_refused(res, field)["message"]


def test_unknown_fields_set_to_null_count_as_absent(server):
    res = send(server, "POST", "/chat/completions", {"messages": BOOK, "max_tokens": 2, "mirostat": None})
    assert res.status_code == 200, res.text


@pytest.mark.parametrize("extra,param", [
    ({"grammar": 'root ::= "a"', "json_schema": {"const": 1}}, "json_schema"),
    ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "response_format"),
    ({"grammar": 'root ::= "a"', "tools": [TEST_TOOL]}, "grammar"),
    ({"json_schema": {"const": 1}, "tools": [TEST_TOOL], "tool_choice": "required"}, "json_schema"),
    ({"n_predict": 0}, "n_predict"),
])
def test_conflicting_constraints_are_refused(server, extra, param):
    assert_refused(send(server, "POST", "/chat/completions", {"messages": BOOK, **extra}), param)


def test_system_fingerprint_is_one_per_server(server):
    """Computed once at load: every answer of a server carries the same one."""
    prints = {send(server, "POST", path, {"messages": BOOK, "max_tokens": 1}).json()["system_fingerprint"]
              for path in ("/chat/completions", "/v1/chat/completions")}
    assert len(prints) == 1


# ---------------------------------------------------------------- the peer-suite table


def test_every_mirror_is_in_the_table():
    """Each upstream test a case names is listed, and each listed as run has a case here."""
    named = {u for fn in globals().values() if callable(fn) for u in getattr(fn, "upstream", ())}
    assert named <= set(PEER_SUITE), named - set(PEER_SUITE)
    run = {k for k, (status, _) in PEER_SUITE.items() if status in (RUN, PENDING)}
    assert run == named, run ^ named


class _Outcomes:
    """A pytest plugin: each test's outcome, keyed by the upstream tests it mirrors."""

    def __init__(self) -> None:
        self.by_upstream: dict[str, Counter] = {}

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            for name in getattr(report, "upstream", ()):
                self.by_upstream.setdefault(name, Counter())[report.outcome] += 1

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: Any, call: Any):
        outcome = yield
        outcome.get_result().upstream = getattr(getattr(item, "function", None), "upstream", ())


def print_peer_table(outcomes: dict[str, Counter]) -> None:
    """One row per upstream test: its status here, the cases that mirror it and how many passed."""
    print(f"\n{'upstream test':<76} {'status':<26} {'cases':>5} {'passed':>6}  note")
    statuses: Counter = Counter()
    all_passed = 0
    for name, (status, note) in PEER_SUITE.items():
        statuses[status] += 1
        counts = outcomes.get(name, Counter())
        cases = sum(counts.values())
        all_passed += cases > 0 and counts["passed"] == cases
        shown = f"{cases:>5} {counts['passed']:>6}" if status in (RUN, PENDING) else " " * 12
        print(f"{name:<76} {status:<26} {shown}  {note}")
    print(f"\nupstream tests: {len(PEER_SUITE)}; run: {statuses[RUN] + statuses[PENDING]} (passed: {all_passed}; "
          f"of them pending features, refused with 400: {statuses[PENDING]}); not applicable: {statuses[NA]}; "
          f"content-dependent: {statuses[CONTENT]}")


if __name__ == "__main__":
    plugin = _Outcomes()
    code = pytest.main(["-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())], plugins=[plugin])
    print_peer_table(plugin.by_upstream)
    sys.exit(code)
