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
from edge_runtime.server.metrics import parse_metrics
from edge_runtime.server.process import ServerProcess

SPEC = SyntheticSpec(tied=False, seed=3)
CHUNK = 16
LONG_TEXT = " ".join(["describe the red box left of the blue circle near the window"] * 60)


@pytest.fixture(scope="module")
def model_dir(artifacts):
    return artifacts.converted(SPEC, "f16")


@pytest.fixture(scope="module")
def server(model_dir):
    args = ["--parallel", "2", "--ctx-size", "4096", "--threads", "1", "--prefill-chunk", str(CHUNK)]
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
