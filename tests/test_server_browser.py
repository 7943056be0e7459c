"""A loopback server that web pages cannot drive: JSON bodies only, loopback Host names only,
no cross-origin calls unless allowed, and bounded JSON (400s, never a 500)."""
from __future__ import annotations

import json

import httpx
import pytest

from edge_models.qwen3vl.synthetic import SyntheticSpec
from support.server import ServerProcess

ALLOWED_ORIGIN = "http://tools.example:3000"
BODY = {"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def server(artifacts):
    args = ["--parallel", "1", "--ctx-size", "512", "--threads", "1", "--cors-origin", ALLOWED_ORIGIN,
            "--allowed-host", "my-box.lan"]
    with ServerProcess(artifacts.converted(SyntheticSpec(), "f16"), args) as proc:
        yield proc


def chat(server, content: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(server.url("/v1/chat/completions"), content=content, headers=headers, timeout=60)


def error_code(resp: httpx.Response) -> str:
    return resp.json()["error"]["code"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_bodies_that_are_not_declared_json_get_415(server, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    resp = chat(server, json.dumps(BODY).encode(), headers)  # a valid request, wrongly labelled
    assert resp.status_code == 415 and error_code(resp) == "unsupported_media_type", resp.text
    ok = chat(server, json.dumps(BODY).encode(), {"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("host, status", [
    ("evil.example", 403), ("evil.example:{port}", 403), ("127.0.0.1.nip.io:{port}", 403),
    ("localhost:{port}", 200), ("127.0.0.1:{port}", 200), ("[::1]:{port}", 200), ("my-box.lan:{port}", 200),
])
def test_only_loopback_or_listed_host_names_are_answered(server, host, status):
    resp = httpx.get(server.url("/v1/models"), headers={"Host": host.format(port=server.port)})
    assert resp.status_code == status, resp.text
    if status == 403:
        assert error_code(resp) == "host_not_allowed" and "--allowed-host" in resp.json()["error"]["message"]


def test_cross_origin_requests_need_an_allowed_origin(server):
    json_headers = {"Content-Type": "application/json"}
    foreign = chat(server, json.dumps(BODY).encode(), {**json_headers, "Origin": "http://evil.example"})
    assert foreign.status_code == 403 and error_code(foreign) == "origin_not_allowed"
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    refused = httpx.options(server.url("/v1/chat/completions"), headers={**preflight, "Origin": "http://evil.example"})
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers

    allowed = httpx.options(server.url("/v1/chat/completions"), headers={**preflight, "Origin": ALLOWED_ORIGIN})
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    resp = chat(server, json.dumps(BODY).encode(), {**json_headers, "Origin": ALLOWED_ORIGIN})
    assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == ALLOWED_ORIGIN

    same = chat(server, json.dumps(BODY).encode(), {**json_headers, "Origin": server.base_url})  # its own page
    assert same.status_code == 200, same.text


@pytest.mark.parametrize("body, code", [
    (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "json_too_deep"),  # 200 KB of nesting
    (b'{"messages": ' + b"[" * 65 + b"]" * 65 + b"}", "json_too_deep"),
    (b'{"messages": [], "seed": ' + b"9" * 5000 + b"}", "invalid_json"),
    (b'{"messages": [], "temperature": 1e999}', "invalid_json"),
])
def test_json_nesting_and_number_sizes_are_bounded(server, body, code):
    resp = chat(server, body, {"Content-Type": "application/json"})
    assert resp.status_code == 400 and error_code(resp) == code, resp.text
    assert httpx.get(server.url("/health")).status_code == 200
