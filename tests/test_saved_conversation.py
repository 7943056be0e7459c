"""Saved conversations: a restored chat continues exactly as the original, without a prefill;
files for other models/settings, truncated or altered files are refused; writes are atomic."""
from __future__ import annotations

import os

import pytest

from edge_common.errors import EdgeError, OutputError
from edge_runtime import VisionChat
from edge_runtime.errors import SavedConversationError
from edge_runtime.chat.saved_conversation import read_conversation

GREEDY = {"temperature": 0.0, "max_tokens": 6}
CTX = 1024


@pytest.fixture(scope="module")
def saved(tiny_f32_dir, test_image, tmp_path_factory):
    """A two-turn conversation about an image, saved; plus what the original says next."""
    path = tmp_path_factory.mktemp("conv") / "talk.edgeconv"
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=CTX) as chat:
        chat.ask("What is in this picture?", images=[test_image], **GREEDY)
        chat.ask("And the colours? " + "Please be precise. " * 60, **GREEDY)  # past llama.cpp's 256-cell minimum
        history = [dict(m) for m in chat.history]
        kv_tokens = chat.engine.seq_state().n_tokens
        size = chat.save(path)
        follow_up = chat.ask("Count the boxes.", **GREEDY)
        cont_stats = chat.last_stats
    return {"path": path, "size": size, "history": history, "kv_tokens": kv_tokens,
            "follow_up": follow_up, "stats": cont_stats}


def test_restored_chat_answers_like_the_original_and_skips_the_prefill(saved, tiny_f32_dir):
    assert saved["size"] == saved["path"].stat().st_size > 0
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=CTX) as chat:
        chat.restore(saved["path"])
        assert [m["role"] for m in chat.history] == ["user", "assistant", "user", "assistant"]
        assert chat.history[1]["content"] == saved["history"][1]["content"]
        image = chat.history[0]["content"][0]["image"]
        original = saved["history"][0]["content"][0]["image"]
        assert (image.digest, image.width, image.height) == (original.digest, original.width, original.height)
        assert image.pixels is None  # only the digest is stored: the KV cache holds the image
        assert chat.engine.seq_state().n_tokens == saved["kv_tokens"]

        answer = chat.ask("Count the boxes.", **GREEDY)
        stats = chat.last_stats
    assert answer == saved["follow_up"]
    assert stats.images_encoded == 0 and stats.encoder_cache_hits == 0
    assert stats.reused_tokens == saved["stats"].reused_tokens  # the same prefix as the live chat
    assert stats.evaluated_tokens == stats.prompt_tokens - stats.reused_tokens < 30


def test_load_opens_the_model_the_file_names(saved):
    with VisionChat.load(saved["path"], n_ctx=CTX) as chat:
        assert chat.ask("Count the boxes.", **GREEDY) == saved["follow_up"]
        assert chat.last_stats.images_encoded == 0


def test_other_kv_type_is_refused_and_the_chat_kept(saved, tiny_f32_dir):
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=CTX, kv_cache_type="bf16") as chat:
        chat.ask("hello", **GREEDY)
        before = list(chat.history)
        with pytest.raises(SavedConversationError, match=r"kv_type_k: saved 'f16', here 'bf16'") as info:
            chat.restore(saved["path"])
        assert isinstance(info.value, EdgeError)
        assert chat.history == before
        # below the fingerprint, llama.cpp's own reader refuses the cells too, and the sequence keeps its own
        conv = read_conversation(saved["path"])
        held = chat.engine.seq_state().n_tokens
        with pytest.raises(SavedConversationError, match="llama.cpp refused the saved KV cells"):
            chat.engine.import_seq(0, conv.units, conv.kv)
        assert chat.engine.seq_state().n_tokens == held > 0


def test_other_model_file_is_refused(saved, tiny_f16_dir):
    with VisionChat.from_dir(tiny_f16_dir, n_ctx=CTX) as chat:
        with pytest.raises(SavedConversationError, match=r"model_sha256: saved [0-9a-f]{12}\.\.\., here"):
            chat.restore(saved["path"])


def test_other_image_token_limit_is_refused(saved, tiny_f32_dir):
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=CTX, image_max_tokens=16) as chat:
        with pytest.raises(SavedConversationError, match="image_max_tokens: saved None, here 16"):
            chat.restore(saved["path"])


def test_context_too_small_is_refused(saved, tiny_f32_dir):
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=256) as chat:
        assert chat.engine.n_ctx_seq < saved["kv_tokens"]
        with pytest.raises(SavedConversationError, match=rf"holds {saved['kv_tokens']} tokens but this context has room for 256"):
            chat.restore(saved["path"])


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[: len(b) // 2], "truncated or damaged"),
    (lambda b: b[:-1], "truncated or damaged"),
    (lambda b: b[:-40] + bytes([b[-40] ^ 0x01]) + b[-39:], "checksum does not match"),  # one bit of the KV data
    (lambda b: b"NOTACONV" + b[8:], "not a saved conversation"),
    (lambda b: b"", "not a saved conversation"),
])
def test_damaged_files_are_refused(saved, tmp_path, tiny_f32_dir, damage, message):
    bad = tmp_path / "bad.edgeconv"
    bad.write_bytes(damage(saved["path"].read_bytes()))
    with pytest.raises(SavedConversationError, match=message):
        read_conversation(bad)


def test_altered_header_is_refused(saved, tmp_path):
    raw = bytearray(saved["path"].read_bytes())
    at = raw.index(b"What is in this picture?")
    raw[at : at + 4] = b"Whaz"
    bad = tmp_path / "edited.edgeconv"
    bad.write_bytes(bytes(raw))
    with pytest.raises(SavedConversationError, match="checksum does not match"):
        read_conversation(bad)


def test_a_failed_write_leaves_the_old_file_and_no_partial(saved, tiny_f32_dir, tmp_path, monkeypatch):
    target = tmp_path / "keep.edgeconv"
    target.write_bytes(saved["path"].read_bytes())
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=CTX) as chat:
        chat.ask("hello", **GREEDY)

        def disk_full(fd):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", disk_full)
        with pytest.raises(OutputError, match=f"cannot write {target}: the disk is full"):
            chat.save(target)
    assert target.read_bytes() == saved["path"].read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.edgeconv"]
