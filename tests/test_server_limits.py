"""Limits that need their own server: a full queue (429), request timeouts, remote images.

Long generations (ignore_eos, 4000 tokens: tens of seconds on the tiny model)
keep a single slot busy; every wait is on an event the server reports, not a sleep.
"""
from __future__ import annotations

import functools
import http.server
import io
import threading
import time

import httpx
import openai
import pytest

from edge_models.qwen3vl.synthetic import SyntheticSpec
from edge_runtime.server.metrics import parse_metrics
from support.server import ServerProcess

SPEC = SyntheticSpec(tied=False, seed=3)
LONG = 4000


@pytest.fixture(scope="module")
def model_dir(artifacts):
    return artifacts.converted(SPEC, "f16")


@pytest.fixture(scope="module")
def busy_server(model_dir):
    args = ["--parallel", "1", "--queue-size", "1", "--ctx-size", "4096", "--threads", "1",
            "--allow-remote-images", "--max-image-bytes", "1M"]
    with ServerProcess(model_dir, args) as proc:
        yield proc


@pytest.fixture(scope="module")
def image_host(tmp_path_factory, test_image):
    """A plain HTTP server on loopback with a small PNG and a too-large BMP."""
    root = tmp_path_factory.mktemp("www")
    test_image.save(root / "photo.png")
    test_image.resize((1024, 768)).save(root / "big.bmp")
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def user(text, image=None):
    content = text if image is None else [{"type": "image_url", "image_url": {"url": image}},
                                          {"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def metrics(server):
    return parse_metrics(httpx.get(server.url("/metrics")).text)


def wait_for(predicate, what, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def chat(server, body, timeout=60):
    return httpx.post(server.url("/v1/chat/completions"), json=body, timeout=timeout)


def test_full_queue_answers_429_with_retry_after(busy_server):
    url = busy_server.url("/v1/chat/completions")
    long = {"messages": user("go on forever"), "max_tokens": LONG, "temperature": 0, "stream": True,
            "ignore_eos": True}
    queued: dict = {}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url, json=long) as running:  # holds the only slot
            assert running.status_code == 200
            lines = running.iter_lines()  # keep it: a dropped line iterator closes the connection
            next(lines)
            waiter = threading.Thread(target=lambda: queued.update(
                resp=chat(busy_server, {"messages": user("short"), "max_tokens": 4})))
            waiter.start()
            wait_for(lambda: metrics(busy_server)["edge_queue_depth"] == 1, "the second request to queue")
            refused = chat(busy_server, {"messages": user("one too many"), "max_tokens": 4})
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "queue_full"
            assert int(refused.headers["retry-after"]) >= 1
        # leaving the stream disconnects: the slot is freed and the queued request runs
    waiter.join(60)
    assert queued["resp"].status_code == 200, queued["resp"].text
    after = metrics(busy_server)
    assert after['edge_requests_total{outcome="rejected"}'] == 1
    assert after['edge_requests_total{outcome="cancelled"}'] >= 1
    assert after["edge_slots_busy"] == 0 and after["edge_queue_depth"] == 0


def test_remote_images_when_allowed(busy_server, image_host, test_image):
    import base64

    buf = io.BytesIO()
    test_image.save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    fetched = chat(busy_server, {"messages": user("x", f"{image_host}/photo.png"), "max_tokens": 6, "temperature": 0})
    inline = chat(busy_server, {"messages": user("x", uri), "max_tokens": 6, "temperature": 0})
    assert fetched.status_code == 200, fetched.text
    assert fetched.json()["choices"][0]["message"] == inline.json()["choices"][0]["message"]
    too_big = chat(busy_server, {"messages": user("x", f"{image_host}/big.bmp")})
    assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "image_too_large"
    missing = chat(busy_server, {"messages": user("x", f"{image_host}/missing.png")})
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "image_fetch_failed"


def test_requests_time_out(model_dir):
    args = ["--parallel", "1", "--ctx-size", "4096", "--threads", "1", "--timeout", "1"]
    with ServerProcess(model_dir, args) as server:
        t0 = time.monotonic()
        resp = chat(server, {"messages": user("go on forever"), "max_tokens": LONG, "temperature": 0,
                             "ignore_eos": True})
        assert resp.status_code == 504, resp.text
        assert resp.json()["error"]["code"] == "timeout"
        assert 1.0 <= time.monotonic() - t0 < 20
        client = openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)
        stream = client.chat.completions.create(model="any", messages=user("go on forever"), max_tokens=LONG,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True})
        with pytest.raises(openai.APIError, match="timeout"):
            for _ in stream:
                pass
        ok = chat(server, {"messages": user("short"), "max_tokens": 3})
        assert ok.status_code == 200
        values = metrics(server)
        assert values['edge_requests_total{outcome="timeout"}'] == 2 and values["edge_slots_busy"] == 0
