"""The engine runs in a child process: killing it ends the requests it held with clear errors,
never the server; the engine comes back and the next request is answered."""
from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai
import pytest

from edge_models.qwen3vl.synthetic import SyntheticSpec
from edge_runtime.server.metrics import parse_metrics
from support.server import ServerProcess

SPEC = SyntheticSpec(tied=False, seed=3)


@pytest.fixture(scope="module")
def server(artifacts):
    with ServerProcess(artifacts.converted(SPEC, "f16"), ["--parallel", "2", "--ctx-size", "2048", "--threads", "1"]) \
            as proc:
        yield proc


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc, no extra package)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            out.append(int(entry))
    return out


def long_body(stream: bool) -> dict:
    return {"model": "any", "messages": [{"role": "user", "content": "tell me everything"}], "max_tokens": 1500,
            "temperature": 0, "stream": stream, "ignore_eos": True}


def test_sigkill_mid_stream_gives_an_error_event_and_the_engine_comes_back(server):
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=60)
    engines = child_pids(server.pid)
    assert len(engines) == 1, "the engine should run in one child process of the server"

    whole: dict = {}

    def non_streaming():  # a second request in flight, waiting for its whole answer
        whole["resp"] = httpx.post(server.url("/v1/chat/completions"), json=long_body(False), timeout=60)

    waiter = threading.Thread(target=non_streaming)
    waiter.start()
    stream = client.chat.completions.create(**{k: v for k, v in long_body(True).items() if k != "ignore_eos"},
                                            extra_body={"ignore_eos": True})
    pieces = iter(stream)
    assert next(pieces).choices[0].delta.role == "assistant"
    next(pieces)  # tokens are flowing
    deadline = time.monotonic() + 30
    while parse_metrics(httpx.get(server.url("/metrics")).text)["edge_slots_busy"] < 2:  # both are in the engine
        assert time.monotonic() < deadline, "the non-streaming request never reached the engine"
        time.sleep(0.02)
    os.kill(engines[0], signal.SIGKILL)
    with pytest.raises(openai.APIError) as caught:
        for _ in pieces:
            pass
    message = str(caught.value)
    assert "engine process died" in message and "signal 9 (SIGKILL)" in message, message
    assert "last llama.cpp log line" in message, message
    waiter.join(60)
    resp = whole["resp"]
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "engine_crashed" and "SIGKILL" in resp.json()["error"]["message"]

    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        health = httpx.get(server.url("/health"), timeout=5)
        seen.append(health.json()["status"])
        if health.status_code == 200:
            break
        time.sleep(0.1)
    assert seen[0] == "restarting" and seen[-1] == "ok", seen
    assert child_pids(server.pid) != engines

    answer = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hello there"}],
                                            max_tokens=8, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens > 0
    values = parse_metrics(httpx.get(server.url("/metrics")).text)
    assert values["edge_engine_restarts_total"] == 1
    assert values['edge_requests_total{outcome="error"}'] == 2  # the two requests the dead engine held
    assert values['edge_requests_total{outcome="ok"}'] >= 1
