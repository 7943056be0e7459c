"""The engine runs in a child process: killing it ends the requests it held with clear errors,
never the server; the engine comes back and the next request is answered."""
from __future__ import annotations

import concurrent.futures
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
    with ServerProcess(artifacts.converted(SPEC, "f16"), ["--parallel", "2", "--ctx-size", "4096", "--threads", "1"]) \
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


def stop_next_engine(server_pid: int, old: list[int], timeout_s: float = 120.0) -> int:
    """SIGSTOP the engine process the server starts next, as soon as it appears (before it can load
    the model: the restart backoff alone is 1 s), and return its pid."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        new = [pid for pid in child_pids(server_pid) if pid not in old]
        if new:
            os.kill(new[0], signal.SIGSTOP)
            return new[0]
        time.sleep(0.005)
    raise AssertionError("the server started no new engine process")


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
    hold = concurrent.futures.ThreadPoolExecutor(1).submit(stop_next_engine, server.pid, engines)
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

    # The restart window (1 s backoff + the new process loading the model) is held open by stopping
    # the new engine process as soon as it exists: /health is read while it certainly is not ready,
    # whatever the machine's load (a first poll after the window would see "ok": the old race).
    held = hold.result(timeout=120)
    try:
        health = httpx.get(server.url("/health"), timeout=10)
        assert health.status_code == 503, (health.status_code, health.text)
        body = health.json()
        assert body["status"] == "restarting" and body["restarts"] == 1 and "SIGKILL" in body["last_exit"], body
        refused = httpx.post(server.url("/v1/chat/completions"), json=long_body(False), timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_restarting", refused.text
        assert "Retry-After" in refused.headers
    finally:
        os.kill(held, signal.SIGCONT)
    deadline = time.monotonic() + 120
    while httpx.get(server.url("/health"), timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "the restarted engine never became ready"
        time.sleep(0.1)
    assert child_pids(server.pid) == [held]

    answer = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hello there"}],
                                            max_tokens=8, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens > 0
    # The engine process counts a finished request and reports it with its next stats message: poll.
    deadline = time.monotonic() + 30
    while (values := parse_metrics(httpx.get(server.url("/metrics")).text))['edge_requests_total{outcome="ok"}'] < 1:
        assert time.monotonic() < deadline, "the answered request was never counted as ok"
        time.sleep(0.05)
    assert values["edge_engine_restarts_total"] == 1
    assert values['edge_requests_total{outcome="error"}'] == 2  # the two requests the dead engine held
