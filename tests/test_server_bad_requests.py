"""Refusals at edge-serve's door that name the right thing: a port in use, wrongly shaped tool
calls, tool schemas nested thousands deep, video sources, and the Origin hint."""
from __future__ import annotations

import collections
import json
import socket
import subprocess
import sys
import time

import httpx
import pytest

from edge_models.qwen3vl.synthetic import SyntheticSpec
from edge_runtime import VisionChat
from edge_runtime.chat.tool_calls import ToolError
from edge_runtime.server.config import ServerOptions
from support.server import REPO_ROOT, ServerProcess

SPEC = SyntheticSpec(tied=False, seed=3)


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("local")


@pytest.fixture(scope="module")
def server(artifacts, local_dir):
    with ServerProcess(artifacts.converted(SPEC, "f16"), ["--parallel", "1", "--ctx-size", "1024", "--threads", "1",
                                                          "--allow-local-dir", str(local_dir)]) as proc:
        yield proc


def post(server, body: dict | bytes, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url("/v1/chat/completions"), content=content, timeout=60,
                      headers={"Content-Type": "application/json", **(headers or {})})


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


def test_a_port_in_use_is_refused_at_once_with_exit_code_2(artifacts):
    model = artifacts.converted(SPEC, "f16")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "edge_runtime.server", str(model), "--port", str(port)],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert f"port {port} on 127.0.0.1 is already in use" in done.stderr and "--port" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    # before the model loads: the interpreter's start and the imports only (a loaded machine is slow at both)
    assert took < 30, took


def test_assistant_tool_calls_of_the_wrong_shape_name_the_field(server):
    for calls, field in (("get_weather", "messages[1].tool_calls"), (["x"], "messages[1].tool_calls[0]"),
                         ([{"function": "f"}], "messages[1].tool_calls[0].function")):
        body = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": calls},
                             {"role": "user", "content": "and?"}], "max_tokens": 2}
        error = error_of(post(server, body), 400)
        assert error["param"] == field and "Undefined" not in error["message"], error


@pytest.mark.parametrize("depth", [70, 5000])
def test_a_tool_schema_nested_thousands_deep_is_a_400_naming_tools(server, depth):
    # 5000 levels are past Python's parser (a RecursionError inside json.loads): the text itself is scanned
    schema = '{"type": "object", "properties": {"a": ' * depth + '{"type": "string"}' + "}}" * depth
    body = ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "tools": [{"type": "function", '
            '"function": {"name": "f", "parameters": ' + schema + "}}]}").encode()
    error = error_of(post(server, body), 400)
    assert error["param"] == "tools" and "deeper than" in error["message"], error
    assert post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).status_code == 200


def test_visionchat_refuses_bad_tool_calls_and_deep_tool_schemas_by_name(artifacts):
    with VisionChat.from_dir(artifacts.converted(SPEC, "f16"), n_ctx=512) as chat:
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": "f"},
                    {"role": "user", "content": "and?"}]
        with pytest.raises(ToolError, match=r"messages\[1\]\.tool_calls must be a list") as caught:
            chat.generate(messages, max_tokens=2)
        assert caught.value.param == "messages[1].tool_calls"
        deep: dict = {"type": "string"}
        for _ in range(5000):
            deep = {"type": "object", "properties": {"a": deep}}
        with pytest.raises(ToolError, match=r"tools\[0\]\.function\.parameters nests deeper than") as caught:
            chat.generate([{"role": "user", "content": "hi"}], tools=[
                {"type": "function", "function": {"name": "f", "parameters": deep}}], max_tokens=2)
        assert caught.value.param == "tools"
        assert chat.generate([{"role": "user", "content": "hi"}], max_tokens=2, temperature=0)  # still answers


def video(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                                      {"type": "text", "text": "what happens?"}]}], "max_tokens": 2}


def test_video_url_refusals_speak_of_videos(server, local_dir):
    (local_dir / "huge.mp4").write_bytes(b"\0" * (64 * 1024 * 1024 + 1))
    for url in ("http://example.invalid/clip.mp4", "../clip.mp4", "missing.mp4", "huge.mp4", "ftp://x/clip.mp4"):
        error = error_of(post(server, video(url)), 400)
        words = error["message"].replace("--allow-remote-images", "")  # the option's name covers videos too
        assert "video" in words and "image" not in words, (url, error)
        assert error["param"] == "messages[0].content[0]", error


def test_the_origin_hint_never_suggests_a_value_the_option_refuses(server):
    for origin in ("null", "chrome-extension://abcdef", "http://evil.example:3000"):
        message = error_of(post(server, {"messages": [{"role": "user", "content": "hi"}]}, {"Origin": origin}),
                           403)["message"]
        suggested = message.split("--cors-origin ", 1)[1].split()[0].strip("',)")
        ServerOptions(REPO_ROOT, cors_origins=(suggested,))  # accepted by the option it names
        assert (suggested == origin) == origin.startswith("http"), message


def test_a_truncated_video_is_reported_truncated_never_audio_only(tmp_path):
    from edge_runtime.vision.video import VideoError, load_video
    from test_video import write_video

    whole = write_video(tmp_path / "whole.mp4").read_bytes()  # video only: no audio stream anywhere
    said = collections.Counter()
    for cut in range(16, len(whole), max(1, len(whole) // 150)):
        (tmp_path / "cut.mp4").write_bytes(whole[:cut])
        try:
            load_video(tmp_path / "cut.mp4", "clip")
        except VideoError as exc:
            assert "audio" not in str(exc), (cut, str(exc))
            said["truncated" in str(exc) or "corrupt" in str(exc)] += 1
    assert said[True] > 0 and said[False] == 0, said
