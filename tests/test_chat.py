"""VisionChat on the tiny converted model: reuse, equivalences, stats, errors."""
from __future__ import annotations

import base64
import io
import json

import pytest
from support.logprobs import assert_logprobs_match, reference_logprobs

from edge_models.qwen3vl.synthetic import SyntheticSpec
from edge_runtime import VisionChat
from edge_runtime.errors import (
    ContextOverflowError,
    EmptyPromptError,
    EngineClosedError,
    ModelFileError,
    ProjectorMismatchError,
    VisionUnsupportedError,
)
from edge_runtime.vision.images import ImageError

GREEDY = {"temperature": 0.0, "max_tokens": 8}


def pair(out_dir):
    m = json.loads((out_dir / "manifest.json").read_text())
    return out_dir / m["text"]["path"], out_dir / m["mmproj"]["path"]


def data_uri(img, fmt="PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def chat(tiny_f32_dir):
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=1024) as c:
        yield c


@pytest.fixture()
def clean(chat):
    chat.reset()
    chat.engine.encoder_cache.clear()
    return chat


def test_follow_up_reuses_kv_and_matches_a_fresh_conversation(clean, tiny_f32_dir, test_image):
    first = clean.ask("What is in this picture?", images=[test_image], **GREEDY)
    s1 = clean.last_stats
    assert s1.images == 1 and s1.image_tokens > 0 and s1.images_encoded == 1 and s1.image_encode_s > 0
    assert s1.reused_tokens == 0 and s1.evaluated_tokens == s1.prompt_tokens

    second = clean.ask("What colour is the box?", **GREEDY)
    s2 = clean.last_stats
    assert s2.reused_tokens >= s1.prompt_tokens
    assert s2.image_encode_s == 0.0 and s2.images_encoded == 0
    assert s2.evaluated_tokens == s2.prompt_tokens - s2.reused_tokens < s1.prompt_tokens
    assert [m["role"] for m in clean.history] == ["user", "assistant", "user", "assistant"]

    history = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(test_image)}},
                                     {"type": "text", "text": "What is in this picture?"}]},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "What colour is the box?"},
    ]
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=1024) as fresh:
        assert fresh.generate(history, **GREEDY) == second
        assert fresh.last_stats.reused_tokens == 0 and fresh.last_stats.images_encoded == 1
        assert fresh.last_stats.prompt_tokens == s2.prompt_tokens


def test_generate_equals_ask_and_leaves_history_alone(clean, tiny_f32_dir, test_image):
    answer = clean.ask("Describe it.", images=[test_image], **GREEDY)
    history = list(clean.history)
    messages = [{"role": "user", "content": [{"type": "image", "image": test_image}, {"type": "text", "text": "Describe it."}]}]
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=1024) as other:
        assert other.generate(messages, **GREEDY) == answer
        assert other.history == []
    assert clean.generate(messages, **GREEDY) == answer
    assert clean.history == history
    assert clean.last_stats.images_encoded == 0  # the same image again: KV prefix or encoder cache


def test_new_conversation_about_the_same_image_skips_the_encoder(clean, test_image):
    clean.ask("What is this?", images=[test_image], **GREEDY)
    assert clean.last_stats.images_encoded == 1
    clean.reset()
    assert clean.history == [] and clean.engine.seq_state(0).n_tokens == 0
    clean.ask("Anything unusual here?", images=[test_image], **GREEDY)
    s = clean.last_stats
    assert s.images_encoded == 0 and s.encoder_cache_hits == 1 and s.image_encode_s == 0.0
    assert s.reused_tokens == 0


def test_stream_yields_what_ask_returns_and_fills_stats(clean, test_image):
    pieces = list(clean.stream("What is in this picture?", [test_image], **GREEDY))
    s = clean.last_stats
    clean.reset()
    assert "".join(pieces) == clean.ask("What is in this picture?", [test_image], **GREEDY)
    assert s.generated_tokens >= 1 and s.stop_reason in ("length", "eog")
    assert s.ttft_s > 0 and s.prefill_s > 0 and s.prefill_tok_s > 0
    assert s.kv_cache_bytes > s.kv_used_bytes > 0 and s.peak_rss_bytes > 0
    decode = s.as_dict()["decode_tok_s"]  # a rate needs two generated tokens; one gives 0
    assert "TTFT" in s.summary() and (decode > 0 if s.generated_tokens > 1 else decode == 0)


def test_stop_strings_and_max_tokens(clean):
    full = clean.generate([{"role": "user", "content": "Say something."}], temperature=0.0, max_tokens=12)
    assert clean.last_stats.stop_reason in ("length", "eog")
    assert len(full) >= 4, f"the fixture's greedy answer {full!r} is too short to hold a stop string"
    stop = full[2:4]
    cut = clean.generate([{"role": "user", "content": "Say something."}], temperature=0.0, max_tokens=12, stop=[stop])
    assert cut == full[: full.index(stop)] and clean.last_stats.stop_reason == "stop"
    clean.generate([{"role": "user", "content": "Say something."}], temperature=0.0, max_tokens=2)
    assert clean.last_stats.generated_tokens <= 2


def test_sampling_is_seeded_and_json_schema_constrains(clean):
    msgs = [{"role": "user", "content": "Pick words."}]
    a = clean.generate(msgs, temperature=1.2, top_k=0, top_p=1.0, seed=7, max_tokens=10)
    b = clean.generate(msgs, temperature=1.2, top_k=0, top_p=1.0, seed=7, max_tokens=10)
    assert a == b
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    out = clean.generate(msgs, json_schema=schema, temperature=0.0, max_tokens=40)
    assert isinstance(json.loads(out)["ok"], bool)


@pytest.mark.parametrize("kind", ["png", "jpeg", "webp", "bmp", "tiff", "gif", "bytes", "data_uri", "pil", "numpy",
                                  "image_url_path", "file_uri"])
def test_image_kinds_load_through_visionchat(chat, test_image, tmp_path, kind):
    import numpy as np

    fmt = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "bmp": "BMP", "tiff": "TIFF", "gif": "GIF"}
    path = tmp_path / "img.png"
    test_image.save(path)
    if kind in fmt:
        path = tmp_path / f"img.{kind}"
        test_image.save(path, format=fmt[kind])
        part = {"type": "image", "image": str(path)}
    elif kind == "bytes":
        part = {"type": "image", "image": path.read_bytes()}
    elif kind == "data_uri":
        part = {"type": "image_url", "image_url": {"url": data_uri(test_image, "JPEG")}}
    elif kind == "pil":
        part = {"type": "image", "image": test_image}
    elif kind == "numpy":
        part = {"type": "image", "image": np.asarray(test_image)}
    elif kind == "image_url_path":
        part = {"type": "image_url", "image_url": {"url": str(path)}}
    else:
        part = {"type": "image_url", "image_url": {"url": path.as_uri()}}
    chat.generate([{"role": "user", "content": [part, {"type": "text", "text": "What?"}]}], temperature=0.0, max_tokens=1)
    assert chat.last_stats.images == 1 and chat.last_stats.image_tokens > 0


def test_system_prompt_reaches_the_template(tiny_f32_dir):
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=512, system_prompt="You are terse.") as c:
        c.ask("Hi", **GREEDY)
        with_system = c.last_stats.prompt_tokens
        assert c.history[0]["role"] == "user"  # the system prompt is not part of the history
        c.system_prompt = None
        c.reset()
        c.ask("Hi", **GREEDY)
        assert c.last_stats.prompt_tokens < with_system


def test_context_overflow_names_the_numbers_and_keeps_the_chat_usable(tiny_f32_dir, test_image):
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=128) as c:
        c.ask("Hi", **GREEDY)
        history = list(c.history)
        n_ctx = c.engine.n_ctx_seq  # llama.cpp may round n_ctx up
        with pytest.raises(ContextOverflowError) as err:
            c.ask("What is this?", images=[test_image], max_tokens=n_ctx)
        message = str(err.value)
        assert f"n_ctx={n_ctx}" in message and f"max_tokens={n_ctx}" in message and "Raise n_ctx" in message
        assert c.history == history
        again = c.ask("Hello again", **GREEDY)  # the conversation goes on after the refusal
        assert c.history[:len(history)] == history and len(c.history) == len(history) + 2
        assert c.history[-1]["content"] == again and c.last_stats.generated_tokens >= 1
        assert c.last_stats.reused_tokens > 0


def test_projector_for_another_model_is_refused(artifacts, tiny_f32_dir):
    text, _ = pair(tiny_f32_dir)
    _, other_mmproj = pair(artifacts.converted(SyntheticSpec(vision_depth=2), "f32"))
    with pytest.raises(ProjectorMismatchError, match=r"n_embd = 192.*n_embd = 128|does not fit"):
        VisionChat(text, other_mmproj, n_ctx=256)


def test_images_for_a_text_only_model(tiny_f32_dir, test_image):
    text, _ = pair(tiny_f32_dir)
    with VisionChat(text, n_ctx=256) as c:
        assert not c.has_vision
        with pytest.raises(VisionUnsupportedError, match="without a projector"):
            c.ask("What is this?", images=[test_image])
        with pytest.raises(VisionUnsupportedError):
            c.generate([{"role": "user", "content": [{"type": "image", "image": test_image}, {"type": "text", "text": "?"}]}])
        answer = c.ask("Just text", **GREEDY)  # the refused calls left the model usable for text
        assert c.last_stats.generated_tokens >= 1 and c.last_stats.images_encoded == 0
        assert c.history[-1]["content"] == answer and len(c.history) == 2


def test_missing_files(tiny_f32_dir, tmp_path):
    text, mmproj = pair(tiny_f32_dir)
    with pytest.raises(ModelFileError, match="not found"):
        VisionChat(tmp_path / "missing.gguf", mmproj)
    with pytest.raises(ModelFileError, match="projector"):
        VisionChat(text, tmp_path / "missing-mmproj.gguf")
    with pytest.raises(ModelFileError, match="manifest.json not found"):
        VisionChat.from_dir(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text(json.dumps({"text": {"path": "gone.gguf"}}))
    with pytest.raises(ModelFileError, match="does not exist"):
        VisionChat.from_dir(broken)


def test_bad_input_raises_and_leaves_the_conversation_usable(clean, tmp_path):
    clean.ask("Hi", **GREEDY)
    history = list(clean.history)
    with pytest.raises(EmptyPromptError):
        clean.ask("   ")
    with pytest.raises(EmptyPromptError):
        clean.generate([])
    with pytest.raises(EmptyPromptError):
        clean.generate([{"role": "user", "content": ""}])
    (tmp_path / "not-an-image.png").write_bytes(b"hello")
    with pytest.raises(ImageError):
        clean.ask("What?", images=[tmp_path / "not-an-image.png"])
    with pytest.raises(TypeError, match="unknown generation option"):
        clean.ask("Hi", temprature=0)
    assert clean.history == history
    clean.ask("Still there?", **GREEDY)
    assert clean.last_stats.reused_tokens > 0


def test_early_close_records_what_was_shown_and_a_second_stream_is_refused(clean):
    stream = clean.stream("Tell me a long story.", temperature=0.0, max_tokens=50)
    first = next(stream)
    with pytest.raises(RuntimeError, match="a stream is still open"):
        clean.ask("Interrupting", **GREEDY)
    stream.close()
    assert clean.last_stats.stop_reason == "cancelled"
    assert clean.history[-1] == {"role": "assistant", "content": first}
    clean.ask("Next question", **GREEDY)
    assert clean.last_stats.reused_tokens > 0


def test_closed_chat_raises(tiny_f32_dir):
    c = VisionChat.from_dir(tiny_f32_dir, n_ctx=256)
    c.close()
    with pytest.raises(EngineClosedError):
        c.ask("Hi")


def test_a_projector_that_would_abort_llama_cpp_is_refused(tiny_f32_dir, tmp_path):
    from gguf import GGUFWriter
    import numpy as np

    from edge_runtime.errors import ModelLoadError

    bad = tmp_path / "mmproj-f16-pos.gguf"
    writer = GGUFWriter(str(bad), "clip")
    writer.add_tensor("v.position_embd.weight", np.zeros((4, 8), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    text, _ = pair(tiny_f32_dir)
    with pytest.raises(ModelLoadError, match="needs F32"):
        VisionChat(text, bad, n_ctx=256)


def test_logprobs_in_stats_match_a_separate_decode(clean, tiny_f32_dir):
    """GenerationOptions.top_logprobs: the core's per-token logprobs, the server's too, in last_stats;
    the greedy answer does not change when they are asked."""
    messages = [{"role": "user", "content": "What is in this picture?"}]
    plain = clean.generate(messages, **{**GREEDY, "max_tokens": 4})
    assert clean.last_stats.logprobs == []  # not asked: none computed
    answer = clean.generate(messages, top_logprobs=2, **{**GREEDY, "max_tokens": 4})
    assert answer == plain
    got = [{"token": e.token.decode("utf-8", "replace"), "logprob": e.logprob, "bytes": list(e.token),
            "top_logprobs": [{"bytes": list(t), "logprob": lp} for t, lp in e.top]} for e in clean.last_stats.logprobs]
    assert 0 < len(got) == clean.last_stats.generated_tokens
    assert_logprobs_match(got, reference_logprobs(tiny_f32_dir, messages, 4, 2))
    assert "logprobs" not in clean.last_stats.as_dict()

