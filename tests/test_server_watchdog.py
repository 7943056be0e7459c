"""A frozen engine process (SIGSTOP mid-stream) is seen as stalled: /health says so, the request it
held ends with a 503, and the server kills and restarts it, then answers again."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import httpx
import openai
import pytest

from edge_models.qwen3vl.synthetic import SyntheticSpec
from edge_runtime.server.watchdog import StallWatch
from support.server import ServerProcess
from test_server_isolation import child_pids, long_body, stop_next_engine

SPEC = SyntheticSpec(tied=False, seed=3)
STALL_S = 4.0


def test_stall_watch_fires_once_when_silent_and_armed():
    now = [0.0]
    fired: list[float] = []
    watch = StallWatch(2.0, fired.append, clock=lambda: now[0])
    now[0] = 50.0
    assert watch.check() is None  # not armed: a loading model sends nothing and is not stalled
    watch.arm()
    now[0] = 51.5
    watch.beat()
    now[0] = 53.0
    assert watch.check() is None  # 1.5 s since the last report
    now[0] = 53.6
    assert watch.check() == pytest.approx(2.1)
    assert watch.check() is None  # once: the supervisor restarts it and arms again when it is ready


def test_a_frozen_engine_is_reported_stalled_and_restarted(artifacts):
    model = artifacts.converted(SPEC, "f16")
    with ServerProcess(model, ["--parallel", "1", "--ctx-size", "2048", "--threads", "1",
                               "--stall-timeout", str(STALL_S)]) as server:
        client = openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=120)
        (engine,) = child_pids(server.pid)
        stream = client.chat.completions.create(**{k: v for k, v in long_body(True).items() if k != "ignore_eos"},
                                                extra_body={"ignore_eos": True})
        pieces = iter(stream)
        next(pieces)
        next(pieces)  # tokens are flowing
        # the new engine process is held as soon as it appears, so /health is read while it is certainly not ready
        hold = concurrent.futures.ThreadPoolExecutor(1).submit(stop_next_engine, server.pid, [engine])
        os.kill(engine, signal.SIGSTOP)
        stopped_at = time.monotonic()
        held = None
        try:
            with pytest.raises(openai.APIError) as caught:
                for _ in pieces:
                    pass
            waited = time.monotonic() - stopped_at
            message = str(caught.value)
            assert "stopped making progress" in message and "--stall-timeout" in message, message
            assert waited >= STALL_S - 0.5, waited  # not before the configured silence
            held = hold.result(timeout=120)
            health = httpx.get(server.url("/health"), timeout=10)
            body = health.json()
            assert health.status_code == 503 and body["status"] == "stalled", health.text
            assert body["restarts"] == 1 and "stalled" in body["last_exit"], body
            refused = httpx.post(server.url("/v1/chat/completions"), json=long_body(False), timeout=10)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_stalled", refused.text
        finally:
            for pid in (engine, held):
                try:
                    if pid is not None:
                        os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 120
        while httpx.get(server.url("/health"), timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the restarted engine never became ready"
            time.sleep(0.1)
        assert engine not in child_pids(server.pid)  # the frozen one was killed, a new one serves
        answer = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hello"}],
                                                max_tokens=8, temperature=0)
        assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens > 0
        assert httpx.get(server.url("/health")).json()["status"] == "ok"
