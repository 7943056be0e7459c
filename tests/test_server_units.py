"""The server's pure pieces: validation, path confinement, slot choice, metrics text."""
from __future__ import annotations

import os

import pytest

from edge_runtime.core.kv_state import image_unit, text_units
from edge_runtime.server.cli import parse_size
from edge_runtime.server.config import ServerOptions, is_loopback
from edge_runtime.server.errors import ApiError
from edge_runtime.server.metrics import Gauges, Metrics, parse_metrics
from edge_runtime.server.schemas import generation_options, parse_chat_request, template_messages
from edge_runtime.server.security import ImagePolicy, bearer_token, confine_path, source_kind
from edge_runtime.server.slots import Candidate, choose_slot


def _request(**fields):
    import json

    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_chat_request(json.dumps(body).encode())


def test_request_maps_to_generation_options():
    gen = generation_options(_request(max_completion_tokens=7, temperature=0, stop="END", seed=5, top_k=3))
    assert (gen.max_tokens, gen.temperature, gen.stop, gen.seed, gen.top_k) == (7, 0, ("END",), 5, 3)
    assert generation_options(_request()).max_tokens is None  # the scheduler fills the slot's room
    assert generation_options(_request(top_p=0)).greedy
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    assert "root" in generation_options(_request(response_format=fmt)).grammar
    assert generation_options(_request(response_format={"type": "json_object"})).grammar


def test_developer_role_and_parts_reach_the_template_shape():
    req = _request(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "what?"},
                                     {"type": "image_url", "image_url": "data:image/png;base64,AAAA"}]},
    ])
    assert template_messages(req) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "what?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
    ]


@pytest.mark.parametrize("body, param, code", [
    (b"{not json", None, "invalid_json"),
    (b"[1, 2]", None, "invalid_json"),
    (b'{"messages": []}', "messages", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}',
     "messages[0].content[0].text", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
     "messages[0].content[0].image_url.url", "invalid_value"),
    (b'{"messages": [{"role": "robot", "content": "x"}]}', "messages[0].role", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "n": 0}', "n", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', "temperature", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}', "top_logprobs", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}', "top_logprobs", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "id_slot": 1}', "id_slot", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "n_predict": 0}', "n_predict", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "mirostat": 2}', "mirostat", "unknown_parameter"),
    (b'{"messages": [{"role": "user", "content": "x"}], "foo": NaN}', "foo", "unknown_parameter"),
    (b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f", '
     b'"parameters": {"type": "object", "properties": {"x": {"type": "number", "minimum": NaN}}}}}]}',
     "tools", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": '
     b'{"name": "s", "schema": {"type": "number", "maximum": -Infinity}}}}', "response_format", "invalid_value"),
])
def test_bad_requests_name_the_field(body, param, code):
    with pytest.raises(ApiError) as info:
        parse_chat_request(body)
    err = info.value.body()["error"]
    assert info.value.status == 400 and err["param"] == param and err["code"] == code
    assert err["type"] == "invalid_request_error" and err["message"]


def test_llama_server_token_limits():
    """llama-server's precedence (server-schema.cpp: n_predict, aliases max_completion_tokens, max_tokens)."""
    assert generation_options(_request(n_predict=4, max_tokens=9)).max_tokens == 4
    assert generation_options(_request(max_completion_tokens=5, max_tokens=9)).max_tokens == 5
    assert generation_options(_request(n_predict=-1, max_tokens=9)).max_tokens is None  # no limit: the slot's room
    assert _request(mirostat=None, logprobs=None).n == 1  # null fields count as not sent


def test_system_fingerprint_follows_the_file_contents(tmp_path):
    from edge_runtime.server.fingerprint import system_fingerprint

    model, copy, projector = tmp_path / "m.gguf", tmp_path / "copy.gguf", tmp_path / "p.gguf"
    model.write_bytes(b"weights" * 1000)
    copy.write_bytes(model.read_bytes())
    projector.write_bytes(b"projector")
    first = system_fingerprint(model, projector)
    assert first.startswith("b") and first == system_fingerprint(copy, projector)  # contents, not paths
    assert system_fingerprint(model, None) != first
    model.write_bytes(b"weights" * 1001)  # (another size: the hash cache keys on size and mtime)
    assert system_fingerprint(model, projector) != first


def test_unusable_json_schema_is_a_400():
    fmt = {"type": "json_schema", "json_schema": {"schema": {"type": "no-such-type"}}}
    with pytest.raises(ApiError) as info:
        generation_options(_request(response_format=fmt))
    assert info.value.body()["error"]["code"] == "invalid_json_schema"


def test_source_kinds():
    assert source_kind("data:image/png;base64,xx") == "data"
    assert source_kind("HTTPS://example.com/a.png") == "remote"
    assert source_kind("file:///tmp/a.png") == source_kind("/tmp/a.png") == source_kind("a.png") == "local"
    assert source_kind("ftp://host/a.png") == "other"


def test_confine_path(tmp_path):
    root = tmp_path / "allowed"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(b"x")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"y")
    os.symlink(secret, root / "escape.png")
    os.symlink(root / "sub" / "a.png", root / "inner.png")
    assert confine_path(root, "sub/a.png") == (root / "sub" / "a.png").resolve()
    assert confine_path(root, str(root / "sub" / "a.png")) == (root / "sub" / "a.png").resolve()
    assert confine_path(root, "inner.png") == (root / "sub" / "a.png").resolve()  # a link that stays inside
    for raw, code in [("../secret.png", "path_not_allowed"), ("sub/../../secret.png", "path_not_allowed"),
                      (str(secret), "path_not_allowed"), ("escape.png", "path_not_allowed"),
                      ("/etc/passwd", "path_not_allowed"), ("missing.png", "image_not_found"),
                      ("sub", "image_not_found")]:
        with pytest.raises(ApiError) as info:
            confine_path(root, raw)
        assert info.value.code == code, raw


def test_image_policy_refuses_by_default():
    policy = ImagePolicy(max_image_bytes=1000)
    for url, code in [("http://example.com/a.png", "remote_images_disabled"),
                      ("/etc/passwd", "local_images_disabled"),
                      ("file:///etc/passwd", "local_images_disabled"),
                      ("gopher://x/y", "unsupported_image_url"),
                      ("data:image/png;base64,AAAA", "invalid_image")]:
        with pytest.raises(ApiError) as info:
            policy.load(url, "messages[0].content[1]")
        assert info.value.code == code and info.value.param == "messages[0].content[1]"


def test_bearer_token():
    assert bearer_token([(b"Authorization", b"Bearer  abc ")]) == b"abc"
    assert bearer_token([(b"authorization", b"Basic abc")]) == b""
    assert bearer_token([]) == b""


def test_slot_choice_prefers_longest_prefix_then_the_emptiest():
    conv = text_units([1, 2, 3, 4]) + [image_unit("img", 16, 4)] + text_units([5, 6])
    other = text_units([9, 9, 9])
    slots = [Candidate(0, other, 1.0), Candidate(1, conv, 2.0), Candidate(2, [], 3.0)]
    assert choose_slot(slots, conv + text_units([7])) == (1, len(conv))
    assert choose_slot(slots, text_units([8])) == (2, 0)  # leaves both conversations cached
    same_image_new_question = text_units([1, 2, 3, 4]) + [image_unit("img", 16, 4)] + text_units([6])
    assert choose_slot(slots, same_image_new_question) == (1, 5)
    assert choose_slot([Candidate(0, other, 5.0), Candidate(1, other, 1.0)], text_units([8])) == (1, 0)  # LRU


def test_metrics_text_is_prometheus():
    m = Metrics(window_s=10)
    m.request("ok")
    m.request("rejected")
    m.tokens_generated(30)
    m.add("decode_steps", 10)
    values = parse_metrics(m.render(Gauges(ready=True, queue_depth=2, slots_busy=1, slots_total=4,
                                           kv_used_bytes=25, kv_total_bytes=100)))
    assert values['edge_requests_total{outcome="ok"}'] == 1
    assert values['edge_requests_total{outcome="rejected"}'] == 1
    assert values['edge_requests_total{outcome="timeout"}'] == 0
    assert values["edge_completion_tokens_total"] == 30
    assert values["edge_decode_tokens_per_second"] == pytest.approx(3.0)
    assert values["edge_queue_depth"] == 2 and values["edge_slots_busy"] == 1
    assert values["edge_kv_cache_usage_ratio"] == 0.25
    m.add("step_seconds:decode", 0.5)
    values = parse_metrics(m.render(Gauges()))
    assert values['edge_decode_step_seconds_total{part="decode"}'] == 0.5
    assert values['edge_decode_step_seconds_total{part="messages"}'] == 0


def test_a_steps_events_reach_the_parent_in_one_message_in_order():
    """The engine process sends a step's events together, in the order the scheduler emitted them
    (streams interleaved), counters first when one ends; nothing is sent for a step without events."""
    from multiprocessing import Pipe

    from edge_runtime.core.stats import GenerationStats
    from edge_runtime.server.engine_process import Outbox, RemoteChannel, Sender
    from edge_runtime.server.jobs import Finished, TextDelta

    parent, child = Pipe()
    sender = Sender(child)
    outbox = Outbox(sender, lambda: sender.send(("stats",)))
    first, second = RemoteChannel(outbox, 1), RemoteChannel(outbox, 2)
    first.put(TextDelta("a"))
    second.put(TextDelta("x"))
    first.put(TextDelta("b"))
    assert not parent.poll()  # held until the step ends
    outbox.flush()
    assert parent.recv() == ("events", [(1, TextDelta("a")), (2, TextDelta("x")), (1, TextDelta("b"))])
    outbox.flush()
    assert not parent.poll()
    done = Finished("length", GenerationStats(generated_tokens=2))
    second.put(TextDelta("y"))
    second.put(done)
    outbox.flush()
    assert parent.recv() == ("stats",)
    assert parent.recv() == ("events", [(2, TextDelta("y")), (2, done)])


def test_options_validation(tmp_path):
    assert ServerOptions(tmp_path).host == "127.0.0.1" and is_loopback("127.0.0.1") and is_loopback("::1")
    assert not is_loopback("0.0.0.0")
    # n_ctx is the whole context, shared by the slots (llama-server's --ctx-size)
    shared = ServerOptions(tmp_path, parallel=3, n_ctx=3072).engine_options()
    assert (shared.n_ctx, shared.n_seq_max) == (3072, 3)
    with pytest.raises(ValueError, match="leaves 50 tokens to each of the 4 slots"):
        ServerOptions(tmp_path, parallel=4, n_ctx=200)
    engine = ServerOptions(tmp_path, n_ubatch=32, mmap=False, repack=False).engine_options()
    assert (engine.n_ubatch, engine.mmap, engine.repack) == (32, False, False)
    with pytest.raises(ValueError):
        ServerOptions(tmp_path, parallel=0)
    with pytest.raises(ValueError):
        ServerOptions(tmp_path, api_key=" ")
    with pytest.raises(ValueError):
        ServerOptions(tmp_path, allow_local_dir=tmp_path / "missing")


def test_parse_size():
    assert parse_size("16M") == 16 << 20 and parse_size("512k") == 512 << 10
    assert parse_size("1GiB") == 1 << 30 and parse_size("100") == 100
    with pytest.raises(ValueError):
        parse_size("lots")


def test_routes_before_the_model_is_loaded(tmp_path):
    """Without the lifespan the scheduler never starts: the state every server has while loading."""
    from fastapi.testclient import TestClient

    from edge_runtime.server.app import create_app

    http = TestClient(create_app(ServerOptions(tmp_path, api_key="k")), base_url="http://localhost")  # a loopback Host
    health = http.get("/health")
    assert health.status_code == 503 and health.json() == {"status": "loading"}
    resp = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                     headers={"Authorization": "Bearer k"})
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "model_loading"
    assert resp.headers["retry-after"] == "2"
    assert http.post("/v1/chat/completions", json={}).status_code == 401


def test_cli_refuses_a_missing_model_dir(tmp_path):
    from click.testing import CliRunner

    from edge_runtime.server.cli import main

    result = CliRunner().invoke(main, [str(tmp_path / "nope")])
    assert result.exit_code == 2 and "not found" in result.output
    result = CliRunner().invoke(main, [str(tmp_path), "--max-body-bytes", "lots"])
    assert result.exit_code == 2 and "not a size" in result.output
