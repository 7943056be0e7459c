"""Saving and restoring conversations through edge-serve: a restored slot serves the follow-up
from its KV cache with the same greedy answer; only the admin key may do it; bad ids, missing files
and files of other settings are refused with OpenAI-shaped errors."""
from __future__ import annotations

import base64
import io

import httpx
import pytest

from edge_models.qwen3vl.synthetic import SyntheticSpec
from edge_runtime import VisionChat
from support.server import ServerProcess

SPEC = SyntheticSpec(tied=False, seed=3)
API_KEY, ADMIN_KEY = "conv-api-key", "conv-admin-key"
ARGS = ["--parallel", "2", "--ctx-size", "2048", "--threads", "1"]
GREEDY = {"temperature": 0, "max_tokens": 6}


@pytest.fixture(scope="module")
def model_dir(artifacts):
    return artifacts.converted(SPEC, "f16")


@pytest.fixture(scope="module")
def conv_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("conversations")


@pytest.fixture(scope="module")
def server(model_dir, conv_dir):
    env = {"EDGE_API_KEY": API_KEY, "EDGE_ADMIN_KEY": ADMIN_KEY}
    with ServerProcess(model_dir, ARGS + ["--conversation-dir", str(conv_dir)], env=env) as proc:
        yield proc


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def chat(server, messages, key=API_KEY):
    resp = httpx.post(server.url("/v1/chat/completions"), headers=auth(key), timeout=120,
                      json={"messages": messages, **GREEDY})
    assert resp.status_code == 200, resp.text
    return resp.json()


def image_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def conversation(server, test_image):
    first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_uri(test_image)}},
                                          {"type": "text", "text": "What is in this picture?"}]}]
    answer = chat(server, first)["choices"][0]["message"]["content"]
    return first + [{"role": "assistant", "content": answer}]


def test_save_then_restore_serves_the_follow_up_from_the_cache(server, conversation, conv_dir):
    follow = conversation + [{"role": "user", "content": "And the colours?"}]
    reference = chat(server, follow)  # while the live slot still holds the conversation
    saved = httpx.put(server.url("/v1/conversations/talk-1"), headers=auth(ADMIN_KEY), timeout=120,
                      json={"messages": conversation})
    assert saved.status_code == 200, saved.text
    info = saved.json()
    assert info["bytes"] == (conv_dir / "talk-1.edgeconv").stat().st_size and info["tokens"] > 0
    listed = httpx.get(server.url("/v1/conversations"), headers=auth(ADMIN_KEY)).json()["data"]
    assert [c["id"] for c in listed] == ["talk-1"]

    # push the conversation out of both slots, so only the file can bring it back
    for text in ("an unrelated question", "another unrelated question", "and a third one"):
        chat(server, [{"role": "user", "content": text}])
    cold = chat(server, follow)
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] < info["tokens"] // 2
    for text in ("evict it again", "and once more"):
        chat(server, [{"role": "user", "content": text}])

    restored = httpx.post(server.url("/v1/conversations/talk-1/restore"), headers=auth(ADMIN_KEY), timeout=120)
    assert restored.status_code == 200, restored.text
    assert restored.json()["messages"] == conversation  # the image comes back as the data: URI sent
    warm = chat(server, restored.json()["messages"] + [{"role": "user", "content": "And the colours?"}])
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] >= info["tokens"] - 8
    assert warm["choices"][0]["message"]["content"] == reference["choices"][0]["message"]["content"]


def test_a_visionchat_file_restores_on_a_server_of_the_same_layout(server, conv_dir, model_dir, test_image):
    # llama.cpp keeps one KV stream per sequence: --parallel 2 is VisionChat's seq_id=1 (two streams)
    with VisionChat.from_dir(model_dir, n_ctx=2048, seq_id=1) as local:
        local.ask("Describe it.", images=[test_image], temperature=0.0, max_tokens=6)
        local.save(conv_dir / "from-python.edgeconv")
    resp = httpx.post(server.url("/v1/conversations/from-python/restore"), headers=auth(ADMIN_KEY), timeout=120)
    assert resp.status_code == 200, resp.text
    assert [m["role"] for m in resp.json()["messages"]] == ["user", "assistant"]
    with VisionChat.from_dir(model_dir, n_ctx=1024) as single:
        single.ask("Describe it.", images=[test_image], temperature=0.0, max_tokens=6)
        single.save(conv_dir / "one-stream.edgeconv")
    resp = httpx.post(server.url("/v1/conversations/one-stream/restore"), headers=auth(ADMIN_KEY), timeout=120)
    assert resp.status_code == 409 and "kv_streams: saved 1, here 2" in resp.json()["error"]["message"]


def test_a_visionchat_conversation_sent_back_from_its_restore_is_answered(server, conv_dir, model_dir, test_image):
    """The restore of a file VisionChat saved gives its images as digest references (it kept no data: URI);
    the server's own schema takes them back while it holds the image, and names what to do when it does not."""
    with VisionChat.from_dir(model_dir, n_ctx=2048, seq_id=1) as local:
        local.ask("Describe it.", images=[test_image], temperature=0.0, max_tokens=6)
        local.save(conv_dir / "sent-back.edgeconv")
        expected = local.ask("And the colours?", temperature=0.0, max_tokens=6)
    resp = httpx.post(server.url("/v1/conversations/sent-back/restore"), headers=auth(ADMIN_KEY), timeout=120)
    assert resp.status_code == 200, resp.text
    messages = resp.json()["messages"]
    image = next(p for p in messages[0]["content"] if p.get("type") == "image")
    assert set(image) == {"type", "digest", "width", "height"} and len(image["digest"]) == 64
    body = {"messages": messages + [{"role": "user", "content": "And the colours?"}], **GREEDY, "max_tokens": 6}
    answer = httpx.post(server.url("/v1/chat/completions"), headers=auth(API_KEY), timeout=120, json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == expected
    assert answer.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0

    unknown = dict(image, digest="0" * 64)  # an image this server never saw: its pixels are needed
    body["messages"] = [{"role": "user", "content": [unknown, {"type": "text", "text": "What is it?"}]}]
    refused = httpx.post(server.url("/v1/chat/completions"), headers=auth(API_KEY), timeout=120, json=body)
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "image_not_cached" and "send it again" in refused.text
    assert chat(server, [{"role": "user", "content": "still answering?"}])["choices"]


@pytest.mark.parametrize("key, status", [(None, 401), ("wrong", 401), (API_KEY, 403)])
def test_only_the_admin_key_may_save_or_restore(server, conversation, key, status):
    headers = auth(key) if key else {}
    for method, path in (("PUT", "/v1/conversations/x"), ("POST", "/v1/conversations/x/restore"),
                         ("GET", "/v1/conversations"), ("DELETE", "/v1/conversations/x")):
        resp = httpx.request(method, server.url(path), headers=headers, json={"messages": conversation})
        assert resp.status_code == status, (method, path, resp.text)
        if status == 403:
            assert resp.json()["error"]["code"] == "admin_key_required"


def test_bad_ids_missing_and_incompatible_files(server, conv_dir, model_dir):
    bad = httpx.put(server.url("/v1/conversations/..%2Fescape"), headers=auth(ADMIN_KEY),
                    json={"messages": [{"role": "user", "content": "x"}]})
    assert bad.status_code in (400, 404)
    bad = httpx.put(server.url("/v1/conversations/has.dot"), headers=auth(ADMIN_KEY),
                    json={"messages": [{"role": "user", "content": "x"}]})
    assert bad.status_code == 400 and "1-64 letters" in bad.json()["error"]["message"]
    missing = httpx.post(server.url("/v1/conversations/nothing-here/restore"), headers=auth(ADMIN_KEY))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "conversation_not_found"

    with VisionChat.from_dir(model_dir, n_ctx=1024, kv_cache_type="bf16") as other:
        other.ask("hello", temperature=0.0, max_tokens=2)
        other.save(conv_dir / "bf16-kv.edgeconv")
    refused = httpx.post(server.url("/v1/conversations/bf16-kv/restore"), headers=auth(ADMIN_KEY))
    assert refused.status_code == 409
    assert "kv_type_k: saved 'bf16', here 'f16'" in refused.json()["error"]["message"]

    damaged = conv_dir / "damaged.edgeconv"
    damaged.write_bytes((conv_dir / "bf16-kv.edgeconv").read_bytes()[:-10])
    refused = httpx.post(server.url("/v1/conversations/damaged/restore"), headers=auth(ADMIN_KEY))
    assert refused.status_code == 409 and "truncated or damaged" in refused.json()["error"]["message"]
    assert httpx.delete(server.url("/v1/conversations/damaged"), headers=auth(ADMIN_KEY)).status_code == 200
    assert not damaged.exists()


def test_conversation_routes_are_off_without_a_directory_and_open_without_keys(model_dir):
    with ServerProcess(model_dir, ARGS) as proc:
        resp = httpx.get(proc.url("/v1/conversations"))
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "conversations_disabled"


def test_options_refuse_an_admin_key_equal_to_the_api_key_and_a_missing_directory(tmp_path):
    from edge_runtime.server.config import ServerOptions

    with pytest.raises(ValueError, match="admin_key must differ from api_key"):
        ServerOptions(tmp_path, api_key="same", admin_key="same")
    with pytest.raises(ValueError, match="--conversation-dir .*missing is not a directory"):
        ServerOptions(tmp_path, conversation_dir=tmp_path / "missing")


def test_a_dangling_symlink_and_an_unwritable_target_are_no_500(server, conv_dir):
    (conv_dir / "dangling.edgeconv").symlink_to(conv_dir / "gone.edgeconv")
    listed = httpx.get(server.url("/v1/conversations"), headers=auth(ADMIN_KEY))
    assert listed.status_code == 200 and "dangling" not in {c["id"] for c in listed.json()["data"]}
    (conv_dir / "blocked.edgeconv").mkdir()  # the target cannot be replaced: a fault of the folder
    refused = httpx.put(server.url("/v1/conversations/blocked"), headers=auth(ADMIN_KEY), timeout=120,
                        json={"messages": [{"role": "user", "content": "x"}]})
    assert refused.status_code == 507 and "conversation 'blocked'" in refused.json()["error"]["message"]
    assert not list(conv_dir.glob(".*partial")) and list((conv_dir / "blocked.edgeconv").iterdir()) == []
    assert httpx.get(server.url("/v1/conversations"), headers=auth(ADMIN_KEY)).status_code == 200


@pytest.mark.parametrize("edit, field", [
    (lambda h: h.update(n_ctx="abc"), "n_ctx"),
    (lambda h: h.update(kv_bytes=float("inf")), "kv_bytes"),
    (lambda h: h["depends_on"].update(kv_streams="2"), "depends_on.kv_streams"),
    (lambda h: h["depends_on"].pop("flash_attn"), "flash_attn"),
    (lambda h: h.update(system_prompt=5), "system_prompt"),
    (lambda h: h["units"].__setitem__(0, ["x"]), "units[].token"),
])
def test_a_damaged_saved_file_is_a_409_naming_the_field_and_the_server_answers_on(server, conv_dir, model_dir,
                                                                                   edit, field):
    from tests.test_refusals import _retamper

    with VisionChat.from_dir(model_dir, n_ctx=2048, seq_id=1) as local:  # the server's layout (--parallel 2)
        local.ask("hello", temperature=0.0, max_tokens=2)
        local.save(conv_dir / "sound.edgeconv")
    _retamper(conv_dir / "sound.edgeconv", conv_dir / "tampered.edgeconv", edit)
    refused = httpx.post(server.url("/v1/conversations/tampered/restore"), headers=auth(ADMIN_KEY), timeout=120)
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "conversation_incompatible" and field in error["message"]
    assert "invalid literal" not in error["message"] and str(conv_dir) not in error["message"]
    assert httpx.post(server.url("/v1/conversations/sound/restore"), headers=auth(ADMIN_KEY),
                      timeout=120).status_code == 200
    chat(server, [{"role": "user", "content": "still there?"}])
