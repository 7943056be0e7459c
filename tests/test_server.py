"""`edge-serve` as clients see it: a real server process, the official `openai` client, raw HTTP.

The model is a tiny random-weight Qwen3-VL (untied, so greedy answers differ
between prompts); answers are compared with `VisionChat` run in this process.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from edge_models.qwen3vl.synthetic import SyntheticSpec
from edge_runtime import VisionChat
from edge_runtime.server.metrics import parse_metrics
from support.logprobs import F16_SUMS_IN_F16
from support.server import ServerProcess

SPEC = SyntheticSpec(tied=False, seed=3)
API_KEY = "test-key-7f3a"
CTX = 2048
SERVER_ARGS = ["--parallel", "4", "--ctx-size", str(4 * CTX), "--threads", "1",
               "--max-body-bytes", "1M", "--max-image-bytes", "512K"]
PROMPTS = ["hello there", "what is the color of the sky", "count to ten", "a b c d", "tell me a story",
           "why is the grass green"]


@pytest.fixture(scope="module")
def model_dir(artifacts):
    return artifacts.converted(SPEC, "f16")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, test_image):
    root = tmp_path_factory.mktemp("served")
    allowed = root / "allowed"
    (allowed / "sub").mkdir(parents=True)
    test_image.save(allowed / "photo.png")
    test_image.save(root / "outside.png")
    os.symlink(root / "outside.png", allowed / "escape.png")
    return allowed


@pytest.fixture(scope="module")
def server(model_dir, image_dir):
    args = SERVER_ARGS + ["--allow-local-dir", str(image_dir)]
    with ServerProcess(model_dir, args, env={"EDGE_API_KEY": API_KEY}) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(model_dir):
    """Single-request answers: VisionChat with the same per-slot context."""
    with VisionChat.from_dir(model_dir, n_ctx=CTX, threads=1) as chat:
        lock = threading.Lock()

        def answer(messages, **gen):
            with lock:
                return chat.generate(messages, **gen)

        yield answer


@pytest.fixture(scope="module")
def image_uri(test_image):
    buf = io.BytesIO()
    test_image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text, image=None):
    if image is None:
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                         {"type": "text", "text": text}]}]


def auth():
    return {"Authorization": f"Bearer {API_KEY}"}


def metrics(server):
    return parse_metrics(httpx.get(server.url("/metrics"), headers=auth()).text)


# ---------------------------------------------------------------- the openai client


def test_an_idle_connection_outlives_the_clients_keep_alive(server):
    """A connection left idle past httpx's 5 s keep-alive expiry (the openai SDK's) is still open: the
    server never closes a connection a client may be reusing at that moment."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", "/health")
        assert conn.getresponse().read() and conn.sock is not None
        time.sleep(6.0)
        conn.request("GET", "/health")  # the same socket: HTTPConnection reconnects only once closed
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_health_and_models(server, client):
    health = httpx.get(server.url("/health"))  # open: no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = client.models.list()
    assert [m.id for m in models.data] == [SPEC_ID(server)]
    assert client.models.retrieve(SPEC_ID(server)).id == SPEC_ID(server)


def SPEC_ID(server):
    return server.model_dir.name


def test_completion_matches_visionchat(client, reference):
    messages = user(PROMPTS[0])
    resp = client.chat.completions.create(model="any", messages=messages, max_tokens=24, temperature=0)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == reference(messages, temperature=0, max_tokens=24)
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 5 and 0 < resp.usage.completion_tokens <= 24
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")


def test_streaming_gives_the_same_text_in_chunks(client, reference):
    messages = user(PROMPTS[1])
    stream = client.chat.completions.create(model="any", messages=messages, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference(messages, temperature=0, max_tokens=24)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals in (["stop"], ["length"])
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 24


def test_image_as_data_uri(client, server, reference, image_uri):
    messages = user("What is in this picture?", image_uri)
    resp = client.chat.completions.create(model="any", messages=messages, max_tokens=16, temperature=0)
    assert resp.choices[0].message.content == reference(messages, temperature=0, max_tokens=16)
    assert metrics(server)["edge_encoder_cache_entries"] == 1  # a later request skips the encoder
    text_only = client.chat.completions.create(model="any", messages=user("What is in this picture?"),
                                               max_tokens=1, temperature=0)
    assert resp.usage.prompt_tokens > text_only.usage.prompt_tokens + 8  # the image's tokens count


def test_follow_up_reuses_the_conversation_prefix(client):
    first_turn = user("Remember the number 17, please.")
    first = client.chat.completions.create(model="any", messages=first_turn, max_tokens=12, temperature=0)
    history = first_turn + [{"role": "assistant", "content": first.choices[0].message.content},
                            {"role": "user", "content": "Which number was it?"}]
    second = client.chat.completions.create(model="any", messages=history, max_tokens=4, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_stop_string_ends_the_answer(client, reference):
    messages = user(PROMPTS[2])
    full = reference(messages, temperature=0, max_tokens=24)
    stop = next(full[i:i + 2] for i in range(4, len(full) - 2) if full[i:i + 2].isprintable() and full[i:i + 2].strip())
    resp = client.chat.completions.create(model="any", messages=messages, max_tokens=24, temperature=0, stop=[stop])
    assert resp.choices[0].message.content == full[: full.index(stop)]
    assert resp.choices[0].finish_reason == "stop"


def test_json_schema_response_format(client):
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}},
              "required": ["color"], "additionalProperties": False}
    resp = client.chat.completions.create(
        model="any", messages=user("Which colour?"), max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "colour", "schema": schema}})
    assert json.loads(resp.choices[0].message.content)["color"] in ("red", "blue")


def test_client_errors_are_openai_shaped(client, server):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="any", messages=user("x"), max_tokens=0)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="any", messages=user("x"), max_tokens=CTX * 4)
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="any", messages=user("x"), n=5)  # more choices than slots
    assert info.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="any", messages=user("x", "data:image/png;base64,bm90IGFuIGltYWdl"))
    assert info.value.body["code"] == "invalid_image" and "messages[0].content[0]" in info.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url("/v1"), api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_logit_bias_and_ignore_eos(client):
    forced = client.chat.completions.create(model="any", messages=user("x"), max_tokens=6, temperature=0,
                                            logit_bias={"300": 100})
    text = forced.choices[0].message.content
    assert forced.usage.completion_tokens == 6 and text == text[: len(text) // 6] * 6  # one token, six times
    banned = client.chat.completions.create(model="any", messages=user("x"), max_tokens=6, temperature=0,
                                            logit_bias={"300": -100})
    assert banned.choices[0].message.content != text
    long = client.chat.completions.create(model="any", messages=user("x"), max_tokens=300, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert long.usage.completion_tokens == 300 and long.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="any", messages=user("x"), logit_bias={"99999999": 1})
    assert info.value.body["param"] == "logit_bias"


# ---------------------------------------------------------------- continuous batching


def test_concurrent_requests_equal_their_single_request_answers(client, server, reference, image_uri):
    """More requests than slots, sent at once: each answer is what it would be alone."""
    cases = [(user(p), {"temperature": 0}) for p in PROMPTS]
    cases.append((user("Describe it.", image_uri), {"temperature": 0}))
    cases += [(user(p), {"temperature": 0.9, "seed": 100 + i}) for i, p in enumerate(PROMPTS[:3])]
    max_tokens = 48
    expected = [reference(m, max_tokens=max_tokens, **g) for m, g in cases]
    before = metrics(server)
    barrier = threading.Barrier(len(cases))

    def ask(case):
        messages, gen = case
        barrier.wait()
        resp = client.chat.completions.create(model="any", messages=messages, max_tokens=max_tokens, **gen)
        return resp.choices[0].message.content

    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(ask, cases))
    # Where f16 products are summed in f16 (ARM's FP16_VA kernels), a row's logits move by ~1e-3 with
    # the rows that share its batch (support/logprobs.py): greedy answers hold, a temperature-0.9 draw
    # may part. x86 sums in f32 and every answer, sampled ones too, is exact.
    exact = len(PROMPTS) + 1 if F16_SUMS_IN_F16 else len(cases)
    assert answers[:exact] == expected[:exact]
    assert all(answers[exact:]), "every sampled answer has text"
    assert len(set(expected)) > len(PROMPTS) // 2  # the prompts really lead to different answers
    after = metrics(server)
    steps = after["edge_decode_steps_total"] - before["edge_decode_steps_total"]
    batched = after["edge_decode_batch_tokens_total"] - before["edge_decode_batch_tokens_total"]
    assert batched / steps > 1.5, "requests were not decoded together"
    assert after["edge_slots_busy"] == 0 and after["edge_queue_depth"] == 0


def wait_for_cancel(server, before):
    key = 'edge_requests_total{outcome="cancelled"}'
    deadline = time.monotonic() + 30
    while True:
        now = metrics(server)
        if now[key] > before[key]:
            return now
        assert time.monotonic() < deadline, "the server did not notice the disconnect"
        time.sleep(0.05)


def test_disconnect_mid_stream_frees_the_slot(server):
    before = metrics(server)
    body = {"model": "any", "messages": user("tell me everything"), "max_tokens": CTX - 64,
            "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.url("/v1/chat/completions"), json=body, headers=auth()) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
    now = wait_for_cancel(server, before)
    assert now["edge_slots_busy"] == 0
    assert now["edge_completion_tokens_total"] - before["edge_completion_tokens_total"] < CTX - 64


def test_disconnect_while_waiting_for_a_whole_answer(server):
    before = metrics(server)
    body = {"model": "any", "messages": user("tell me everything"), "max_tokens": CTX - 64,
            "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url("/v1/chat/completions"), json=body, headers=auth(), timeout=0.5)
    now = wait_for_cancel(server, before)
    assert now["edge_slots_busy"] == 0
    assert now["edge_completion_tokens_total"] - before["edge_completion_tokens_total"] < CTX - 64


# ---------------------------------------------------------------- refusals (raw HTTP)


def post(server, body, headers=None):
    """POST a JSON-able dict, or raw bytes / a byte generator as they are."""
    payload = {"json": body} if isinstance(body, dict) else {"content": body}
    json_type = {"Content-Type": "application/json"}
    return httpx.post(server.url("/v1/chat/completions"), headers={**auth(), **json_type, **(headers or {})},
                      timeout=60, **payload)


def assert_error(resp, status, code=None, param=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("path", ["/v1/models", "/metrics", "/v1/chat/completions", "/nowhere"])
def test_api_key_is_required_everywhere_but_health(server, path):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": API_KEY}):
        resp = httpx.request("POST" if "chat" in path else "GET", server.url(path), headers=headers,
                             json={"messages": user("x")})
        assert_error(resp, 401, "invalid_api_key")
        assert resp.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url("/health")).status_code == 200


def test_malformed_json_and_schema_errors(server):
    before = metrics(server)['edge_requests_total{outcome="invalid"}']
    assert_error(post(server, b'{"messages": [}'), 400, "invalid_json")
    assert_error(post(server, {"messages": "hi"}), 400, param="messages")
    assert_error(post(server, {"messages": user("x"), "temperature": 5}), 400, param="temperature")
    assert_error(post(server, {"messages": user("x"), "stop": ["a"] * 40}), 400, param="stop")
    assert_error(post(server, {"messages": user("x"), "response_format": {"type": "json_schema"}}), 400)
    assert_error(httpx.get(server.url("/v1/chat/completions"), headers=auth()), 405)
    assert metrics(server)['edge_requests_total{outcome="invalid"}'] == before + 5


def test_nan_settings_and_lone_surrogates_are_400(server):
    """Issue 10: NaN sampling settings and text UTF-8 cannot encode get an OpenAI-shaped 400, not a crash."""
    for name in ("temperature", "repeat_penalty", "top_p"):
        body = b'{"messages": [{"role": "user", "content": "x"}], "%s": NaN}' % name.encode()
        assert_error(post(server, body), 400, param=name)
    err = assert_error(post(server, b'{"messages": [{"role": "user", "content": "ab\\ud800"}]}'), 400)
    assert "U+D800" in err["message"] and "character 2" in err["message"]
    assert post(server, {"messages": user("x"), "max_tokens": 2}).status_code == 200  # still serving


def test_body_size_limit(server):
    big = {"messages": user("x" * (1 << 20))}
    assert_error(post(server, big), 413, "request_too_large")

    def chunked():  # no Content-Length: the limit is enforced while reading
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"y" * 32768
        yield b'"}]}'

    assert_error(post(server, chunked()), 413, "request_too_large")
    assert httpx.get(server.url("/health")).status_code == 200


def test_remote_image_urls_are_refused_by_default(server):
    body = {"messages": user("x", "https://example.com/cat.png")}
    assert_error(post(server, body), 400, "remote_images_disabled", "messages[0].content[0]")


def test_local_paths_are_confined_to_the_allowed_dir(server, image_dir, image_uri):
    ok = post(server, {"messages": user("x", "photo.png"), "max_tokens": 4, "temperature": 0})
    assert ok.status_code == 200, ok.text
    by_uri = post(server, {"messages": user("x", image_uri), "max_tokens": 4, "temperature": 0})
    assert ok.json()["choices"][0]["message"]["content"] == by_uri.json()["choices"][0]["message"]["content"]
    assert post(server, {"messages": user("x", f"file://{image_dir}/photo.png"), "max_tokens": 1}).status_code == 200
    for url, code in [("../outside.png", "path_not_allowed"), ("sub/../../outside.png", "path_not_allowed"),
                      (str(image_dir.parent / "outside.png"), "path_not_allowed"),
                      ("escape.png", "path_not_allowed"), ("/etc/passwd", "path_not_allowed"),
                      ("file:///etc/passwd", "path_not_allowed"), ("missing.png", "image_not_found")]:
        assert_error(post(server, {"messages": user("x", url)}), 400, code)


def test_image_size_limit(server, test_image):
    buf = io.BytesIO()
    test_image.resize((1024, 768)).save(buf, format="BMP")  # 2.3 MB uncompressed
    uri = "data:image/bmp;base64," + base64.b64encode(buf.getvalue()[: 700_000]).decode()
    assert_error(post(server, {"messages": user("x", uri)}), 400, "image_too_large", "messages[0].content[0]")


@pytest.mark.torch
def test_image_detail_levels_and_their_cost_in_usage(server):
    """image_url.detail picks each image's budget; usage reports tokens, grid and why (checked against HF)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    from tests.conftest import make_test_image

    buf = io.BytesIO()
    make_test_image(500, 333, seed=21).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"model": "any", "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": uri, "detail": "low"}},
        {"type": "image_url", "image_url": {"url": uri}},
        {"type": "text", "text": "Same?"}]}]}
    resp = httpx.post(server.url("/v1/chat/completions"), json=body, headers=auth(), timeout=300)
    assert resp.status_code == 200, resp.text
    usage = resp.json()["usage"]
    low, auto = usage["images"]
    assert (low["detail"], auto["detail"]) == ("low", "auto")
    for img in (low, auto):
        h, w = hf_smart_resize(333, 500, factor=32, min_pixels=img["min_tokens"] * 1024,
                               max_pixels=img["max_tokens"] * 1024)
        assert img["tokens"] == (h // 32) * (w // 32) and img["grid"] == [w // 32, h // 32]
        assert img["source_size"] == [500, 333]
    assert usage["prompt_tokens_details"]["image_tokens"] == low["tokens"] + auto["tokens"]
    body["messages"][0]["content"][0]["image_url"]["detail"] = "huge"
    bad = httpx.post(server.url("/v1/chat/completions"), json=body, headers=auth(), timeout=60)
    assert bad.status_code == 400 and "detail must be one of low, auto, high" in bad.json()["error"]["message"]


def test_decode_only_steps_are_counted_and_profiled(server, client):
    """A lone answer of N tokens takes its first from the prompt's step and the other N - 1 from steps
    holding its token alone: those are counted and split by part in /metrics, current by the time the
    answer is read (the engine process sends counters before an answer's end)."""
    from edge_runtime.core.step import STEP_PARTS

    deadline = time.monotonic() + 30
    while metrics(server)["edge_slots_busy"]:  # what an earlier test left running is cancelled by now
        assert time.monotonic() < deadline
        time.sleep(0.05)
    before = metrics(server)
    resp = client.chat.completions.create(model="any", messages=user("count to ten"), max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True})
    after = metrics(server)
    assert resp.usage.completion_tokens == 6
    delta = {k: after[k] - before[k] for k in after}
    assert delta["edge_decode_only_tokens_total"] == delta["edge_decode_only_steps_total"] == 5
    parts = {p: delta[f'edge_decode_step_seconds_total{{part="{p}"}}'] for p in STEP_PARTS}
    assert parts["decode"] > 0 and all(v >= 0 for v in parts.values()), parts
