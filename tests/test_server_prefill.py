"""Chunked prefill: a new prompt (image included) is evaluated a chunk per decode step of the
running streams, and the answer is the one a single request gets."""
from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import pytest

from edge_models.qwen3vl.synthetic import SyntheticSpec
from edge_runtime import VisionChat
from edge_runtime.vision.disk_cache import SUFFIX
from edge_runtime.server.metrics import parse_metrics
from support.server import ServerProcess

SPEC = SyntheticSpec(tied=False, seed=3)
CHUNK = 16
LONG_TEXT = " ".join(["describe the red box left of the blue circle near the window"] * 60)


@pytest.fixture(scope="module")
def model_dir(artifacts):
    return artifacts.converted(SPEC, "f16")


@pytest.fixture(scope="module")
def server(model_dir):
    # no latency cut: auto budgets follow the context alone, whatever the machine's load
    args = ["--parallel", "2", "--ctx-size", "8192", "--threads", "1", "--prefill-chunk", str(CHUNK),
            "--image-latency", "1e6"]
    with ServerProcess(model_dir, args) as proc:
        yield proc


def metrics(server):
    return parse_metrics(httpx.get(server.url("/metrics")).text)


def test_a_long_prompt_with_an_image_is_evaluated_between_decode_steps(server, model_dir, test_image):
    buf = io.BytesIO()
    test_image.save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                             {"type": "text", "text": LONG_TEXT}]}]
    stop = threading.Event()

    def running_stream():
        body = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 3500, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=120) as http, http.stream("POST", server.url("/v1/chat/completions"),
                                                            json=body) as resp:
            for _ in resp.iter_lines():
                if stop.is_set():
                    return

    stream = threading.Thread(target=running_stream)
    stream.start()
    deadline = time.monotonic() + 60
    while metrics(server)["edge_completion_tokens_total"] < 5:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    before = metrics(server)
    resp = httpx.post(server.url("/v1/chat/completions"), timeout=120,
                      json={"messages": messages, "max_tokens": 12, "temperature": 0})
    after = metrics(server)
    stop.set()
    stream.join(60)
    assert resp.status_code == 200, resp.text
    usage = resp.json()["usage"]
    assert usage["prompt_tokens"] > 40 * CHUNK
    # the running stream decoded while the prompt went in: a step per chunk, at least
    steps = after["edge_decode_steps_total"] - before["edge_decode_steps_total"]
    assert steps >= usage["prompt_tokens"] // CHUNK, (steps, usage)
    with VisionChat.from_dir(model_dir, n_ctx=4096, threads=1) as chat:  # evaluated whole, image in one go
        assert resp.json()["choices"][0]["message"]["content"] == chat.generate(messages, max_tokens=12,
                                                                                temperature=0)


def test_auto_budgets_follow_the_rates_the_first_encode_measures(model_dir, test_image, tmp_path):
    """A fresh server calibrates this device at load and plans its first image from that; its vision
    thread's first encode replaces the calibration, and the next image is planned from the measured
    rate, as a later process planning from the stored rates would."""
    cache = tmp_path / "cache"
    buf = io.BytesIO()
    test_image.save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def ask(proc) -> dict:
        body = {"model": "m", "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uri, "detail": "auto"}},
            {"type": "text", "text": "what is it"}]}]}
        r = httpx.post(proc.url("/v1/chat/completions"), json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["images"][0]

    latency = 0.5
    # one slot: its 2048 cells are VisionChat's below (with --parallel 2 each slot would have half)
    args = ["--ctx-size", "2048", "--parallel", "1", "--threads", "1", "--image-latency", repr(latency)]
    with ServerProcess(model_dir, args, env={"XDG_CACHE_HOME": str(cache)}) as proc:
        first = ask(proc)
        deadline = time.monotonic() + 30
        while True:  # the plans reach the HTTP process with the next stats message (every 0.1 s)
            second = ask(proc)
            if second["rates"] == "measured" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        while True:  # the prefill rate is measured by the first image slice alone in its step: until it is in
            time.sleep(0.3)
            again = ask(proc)
            if again["predicted_s"] == second["predicted_s"] or time.monotonic() > deadline:
                break
            second = again
    stored = cache / "qwen3-vl-edge" / "device-cost.json"
    with VisionChat.from_dir(model_dir, n_ctx=2048, threads=1, image_latency_s=latency,
                             cost_cache_dir=stored.parent) as measured:
        planned = measured.engine.plan_image("auto")
        assert measured.engine.cost.source == "measured"  # read back, not calibrated again
        assert measured.engine.cost.prefill_measured  # the image's tokens, evaluated alone in their step
    assert first["rates"] == "calibration" and first["max_tokens"] >= first["floor"] == 256
    assert second["rates"] == "measured" and second["max_tokens"] == planned.max_tokens
    # usage rounds seconds to 3 decimals (half a millisecond at most)
    assert second["predicted_s"] == pytest.approx(planned.predicted_s, rel=1e-3, abs=5.1e-4)


def test_the_images_of_one_message_share_auto_budget_in_the_server(server, test_image):
    """The HTTP process plans with the engine's planner: two images of one message split the budget."""
    buf = io.BytesIO()
    test_image.save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    part = {"type": "image_url", "image_url": {"url": uri}}

    def images_of(n: int) -> list[dict]:
        body = {"model": "m", "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": [
            *([part] * n), {"type": "text", "text": "what is it"}]}]}
        r = httpx.post(server.url("/v1/chat/completions"), json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["images"]

    images_of(1)  # the first image measures this device
    time.sleep(0.5)  # its rates reach the HTTP process with the next stats message
    (one,), two = images_of(1), images_of(2)
    assert len(two) == 2 and two[0]["max_tokens"] == two[1]["max_tokens"] < one["max_tokens"]
    assert "shared by the 2 images of the message" in two[0]["reason"] and "shared" not in one["reason"]


def test_boxes_raise_the_floor_and_usage_reports_the_plan(server, test_image):
    """A request for boxes (the page's Locate mode: a json_schema with bbox_2d) plans its image at the
    grounding floor; usage says the need, the floor, the predicted seconds and whether they meet the target."""
    buf = io.BytesIO()
    test_image.save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    boxes = {"type": "array", "items": {"type": "object", "properties": {
        "bbox_2d": {"type": "array", "items": {"type": "integer"}}, "label": {"type": "string"}}}}

    def image_of(text: str, **extra) -> dict:
        body = {"model": "m", "max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": text}]}], **extra}
        r = httpx.post(server.url("/v1/chat/completions"), json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["images"][0]

    look = image_of("what is it")
    located = image_of("List them.", response_format={"type": "json_schema",
                                                      "json_schema": {"name": "boxes", "schema": boxes}})
    read = image_of("Read the sign.")
    assert (look["need"], look["floor"]) == ("", 256) and look["max_tokens"] == 2048  # half the slot's 4096
    assert (located["need"], located["floor"]) == ("grounding", 1024) and located["max_tokens"] >= 1024
    assert (read["need"], read["floor"]) == ("text", 1024)
    for image in (look, located, read):
        assert image["predicted_s"] > 0 and image["target_s"] == 1e6 and isinstance(image["meets_target"], bool)
        assert image["meets_target"] == (image["predicted_s"] <= image["target_s"])


def test_edge_serve_fills_the_disk_encoder_cache_and_another_server_reads_it(model_dir, test_image, tmp_path):
    """One encode path: the server writes what it encodes to the disk cache (as VisionChat does), so a
    second server process (empty memory cache) answers the same image without running the encoder."""
    buf = io.BytesIO()
    test_image.save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                      {"type": "text", "text": "What is this?"}]}],
            "max_tokens": 6, "temperature": 0}
    cache = tmp_path / "encoder"
    args = ["--parallel", "1", "--ctx-size", "2048", "--threads", "1", "--encoder-cache-dir", str(cache)]
    answers, counts = [], []
    for _ in range(2):
        with ServerProcess(model_dir, args) as proc:
            resp = httpx.post(proc.url("/v1/chat/completions"), json=body, timeout=120)
            assert resp.status_code == 200, resp.text
            answers.append(resp.json()["choices"][0]["message"]["content"])
            m = metrics(proc)
            counts.append((m["edge_images_encoded_total"], m["edge_encoder_disk_hits_total"]))
        if len(counts) == 1:
            assert len(list(cache.glob(f"*/*{SUFFIX}"))) == 1  # the image's encoder output, under the projector's dir
    assert counts == [(1, 0), (0, 1)]
    assert answers[0] == answers[1]


TOOLS = [{"type": "function", "function": {"name": "zoom_in", "description": "Crop the image", "parameters": {
    "type": "object", "properties": {"box": {"type": "array", "items": {"type": "integer"}, "minItems": 4,
                                             "maxItems": 4}, "label": {"type": "string", "enum": ["cat", "dog"]}},
    "required": ["box", "label"], "additionalProperties": False}}}]


@pytest.mark.parametrize("tool_choice", ["auto", {"type": "function", "function": {"name": "zoom_in"}}])
def test_the_server_and_visionchat_give_the_same_answer_with_image_video_and_tools(server, model_dir, test_image,
                                                                                   tmp_path, tool_choice):
    """The same batched core behind both: greedy, the same GGUF, an image, a video and tools in one prompt
    (the server evaluates it in chunks of 16 between other steps, VisionChat in one go): identical text."""
    from test_video import write_video

    buf = io.BytesIO()
    test_image.save(buf, format="PNG")
    image_uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    video_uri = "data:video/mp4;base64," + base64.b64encode(write_video(tmp_path / "v.mp4").read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_uri}},
                                             {"type": "video_url", "video_url": {"url": video_uri}},
                                             {"type": "text", "text": "What happens, and where is the cat?"}]}]
    resp = httpx.post(server.url("/v1/chat/completions"), timeout=120, json={
        "messages": messages, "tools": TOOLS, "tool_choice": tool_choice, "max_tokens": 160, "temperature": 0})
    assert resp.status_code == 200, resp.text
    served = resp.json()["choices"][0]["message"]
    with VisionChat.from_dir(model_dir, n_ctx=4096, threads=1) as chat:
        local = chat.generate(messages, tools=TOOLS, tool_choice=tool_choice, max_tokens=160, temperature=0)
    assert (served["content"] or "") == local.content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in served.get("tool_calls") or []] == \
        [(c.name, c.arguments) for c in local.tool_calls]
    if tool_choice != "auto":
        assert len(local.tool_calls) == 1  # the forced call: the grammar path of both
