"""Video input: sampling, timing and sizing as transformers does it; bad clips refused clearly.

Every clip is written by PyAV inside the test (nothing is downloaded). Expected sampling,
timestamps and sizes come from transformers' Qwen3-VL video processor and processor.
"""
from __future__ import annotations

import base64
import math

import av
import numpy as np
import pytest

from edge_runtime import VisionChat
from edge_runtime.errors import ContextOverflowError
from edge_runtime.vision.video import (
    VideoError,
    VideoOptions,
    group_timestamps,
    load_video,
    plan_size,
    sample_indices,
)


def write_video(path, n_frames=30, fps=10, size=(96, 128), codec="mpeg4", container=None, moving=True):
    h, w = size
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(n_frames):
            frame = np.full((h, w, 3), (i * 8 if moving else 80) % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def chat(tiny_f16_dir):
    with VisionChat.from_dir(tiny_f16_dir, n_ctx=1024) as c:
        yield c


# ---------------------------------------------------------------- against transformers


@pytest.mark.torch
@pytest.mark.parametrize("total,source_fps,fps,max_frames", [
    (30, 10.0, 2.0, 768), (300, 30.0, 2.0, 768), (7, 25.0, 2.0, 768), (1000, 29.97, 2.0, 32), (3, 1.0, 0.5, 768),
])
def test_sampling_matches_transformers(total, source_fps, fps, max_frames):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    vp = Qwen3VLVideoProcessor(max_frames=max_frames)
    expected = vp.sample_frames(VideoMetadata(total_num_frames=total, fps=source_fps), fps=fps)
    assert sample_indices(total, source_fps, fps, 4, max_frames).tolist() == list(expected)


@pytest.mark.torch
@pytest.mark.parametrize("indices,fps", [([0, 6, 12, 17, 23, 29], 10.0), ([0, 15, 30], 30.0), (list(range(9)), 2.0)])
def test_timestamps_match_transformers(indices, fps):
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    assert group_timestamps(indices, fps) == Qwen3VLProcessor._calculate_timestamps(None, list(indices), fps, 2)


@pytest.mark.torch
@pytest.mark.parametrize("frames,height,width,budget", [(20, 480, 640, 512), (20, 480, 640, 4096), (8, 1080, 1920, 768),
                                                         (6, 100, 3000, 512), (4, 50, 40, 512)])
def test_clip_size_is_transformers_smart_resize(frames, height, width, budget):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    t_bar = round(frames / 2) * 2
    expected = smart_resize(frames, height, width, temporal_factor=2, factor=32,
                            min_pixels=t_bar * 8 * 1024, max_pixels=budget * 2 * 1024)
    assert plan_size(frames, height, width, budget) == expected


def test_file_clip_uses_the_sampled_frames_and_budget(tmp_path):
    path = write_video(tmp_path / "c.mp4", n_frames=100, fps=10, size=(480, 640))  # 10 s
    clip = load_video(path, options=VideoOptions(max_tokens=512))
    assert len(clip.indices) == 20 and clip.indices[0] == 0 and clip.indices[-1] == 99
    assert clip.n_groups == 10 and len(clip.frames) == 20
    assert clip.n_tokens <= 512 and (clip.height, clip.width) == (192, 256)
    assert clip.timestamps[0] == pytest.approx((0 + 5) / 2 / 10)
    # a pair shares one digest (the group's cache key); groups differ
    assert clip.frames[0].digest == clip.frames[1].digest != clip.frames[2].digest


def test_long_clip_is_sampled_uniformly_within_the_default_budget(tmp_path):
    path = write_video(tmp_path / "long.mp4", n_frames=600, fps=10, size=(96, 128))  # 60 s
    clip = load_video(path)
    assert clip.n_tokens <= 512 and clip.tokens_per_group >= 8
    assert len(clip.indices) == VideoOptions().frame_cap() == 32  # 512 tokens / 32 per group, x2 frames
    assert clip.timestamps[-1] > 55


# ---------------------------------------------------------------- the chat


def test_video_answer_and_follow_up_reuse(chat, tmp_path):
    path = write_video(tmp_path / "v.mp4")
    chat.reset()
    chat.ask("What happens?", videos=[path], max_tokens=4)
    first = chat.last_stats
    assert first.images == 3 and first.images_encoded == 3 and first.image_tokens == 3 * 12
    chat.ask("And then?", max_tokens=4)
    follow = chat.last_stats
    assert follow.images_encoded == 0 and follow.reused_tokens >= first.prompt_tokens
    chat.reset()
    chat.ask("Again?", videos=[path], max_tokens=4)  # new conversation, same clip: the encoder cache serves it
    assert chat.last_stats.images_encoded == 0 and chat.last_stats.encoder_cache_hits == 3
    chat.reset()


def test_a_repeated_frame_pair_is_encoded_once(chat):
    still = np.full((64, 96, 3), 120, np.uint8)
    chat.reset()
    chat.engine.encoder_cache.clear()
    chat.ask("Anything?", videos=[[still] * 8], max_tokens=2)
    assert chat.last_stats.images == 4 and chat.last_stats.images_encoded == 1
    assert chat.last_stats.encoder_cache_hits == 3
    chat.reset()


def test_generate_takes_video_url_and_video_parts(chat, tmp_path):
    path = write_video(tmp_path / "g.mp4")
    uri = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
    for part in ({"type": "video_url", "video_url": {"url": uri}}, {"type": "video", "video": str(path)}):
        chat.generate([{"role": "user", "content": [part, {"type": "text", "text": "What?"}]}], max_tokens=2)
        assert chat.last_stats.images == 3
    assert chat.history == []


def test_many_images_fit_until_the_context_then_a_clear_error(chat, test_image):
    chat.reset()
    chat.ask("Compare.", images=[test_image] * 6, max_tokens=2)  # 6 x 48 image tokens
    assert chat.last_stats.images == 6
    before = list(chat.history)
    with pytest.raises(ContextOverflowError, match=r"needs \d+ tokens.*n_ctx=1024"):
        # detail low keeps each at its natural 48 tokens (auto would split the half context among the 30)
        chat.ask("More.", images=[test_image] * 30, detail="low", max_tokens=2)
    assert chat.history == before  # the refused turn left the conversation as it was
    answer = chat.ask("Still there?", max_tokens=2)
    assert len(chat.history) == len(before) + 2 and chat.history[-1] == {"role": "assistant", "content": answer}
    assert chat.last_stats.images == 6  # the six images of the kept turn are still in the prompt
    chat.reset()


# ---------------------------------------------------------------- bad input


def _corrupt(tmp_path):
    good = write_video(tmp_path / "good.mp4").read_bytes()
    return good[: len(good) // 3] + bytes(64)


def _audio_only(tmp_path):
    path = tmp_path / "a.wav"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _zero_frames(tmp_path):
    path = tmp_path / "zero.avi"  # AVI keeps a video stream that holds no frame
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        out.start_encoding()  # header written, no frame ever muxed
        for packet in stream.encode():
            out.mux(packet)
    return path


def _unknown_codec(tmp_path):
    data = write_video(tmp_path / "u.mkv", codec="mpeg4").read_bytes()
    assert b"V_MPEG4/ISO/ASP" in data
    path = tmp_path / "unknown.mkv"
    path.write_bytes(data.replace(b"V_MPEG4/ISO/ASP", b"V_QQQQQ/ISO/ASP"))
    return path


def _write(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


BAD = {
    "empty": (lambda tmp: _write(tmp, "e.mp4", b""), r"no data \(0 bytes\)"),
    "not-a-video": (lambda tmp: _write(tmp, "t.mp4", b"hello, world" * 50), r"not a video"),
    "corrupt": (lambda tmp: _write(tmp, "c.mp4", _corrupt(tmp)), r"corrupt|truncated|no frame"),
    "audio-only": (_audio_only, r"no video stream .*audio"),
    "zero-frame": (_zero_frames, r"no frames|no frame could be decoded|zero-frame"),
    "unsupported-codec": (_unknown_codec, r"codec"),
    "missing": (lambda tmp: tmp / "nope.mp4", r"not found"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_video_files_are_refused_clearly_and_the_chat_stays_usable(chat, tmp_path, case):
    make, message = BAD[case]
    path = make(tmp_path)
    chat.reset()
    chat.ask("Hello", max_tokens=2)
    history = list(chat.history)
    with pytest.raises(VideoError, match=message) as info:
        chat.ask("What happens?", videos=[path], max_tokens=2)
    assert "video 1" in str(info.value)
    assert chat.history == history
    chat.ask("Still there?", max_tokens=2)
    assert len(chat.history) == len(history) + 2
    chat.reset()


def test_huge_resolution_is_refused_before_decoding(tmp_path):
    path = write_video(tmp_path / "big.mp4", n_frames=2, size=(96, 128))
    with pytest.raises(VideoError, match=r"128x96 frames exceed VideoOptions.max_side=64"):
        load_video(path, options=VideoOptions(max_side=64))


@pytest.mark.parametrize("kwargs,message", [
    ({"fps": 0}, r"fps=0 is out of range"), ({"fps": -1.0}, "fps"), ({"fps": math.nan}, "fps"),
    ({"fps": 1e9}, "fps"), ({"max_frames": 0}, r"max_frames=0 is out of range"),
    ({"max_frames": 10**6}, "max_frames"), ({"max_tokens": 2}, r"max_tokens=2 must be"),
])
def test_absurd_options_are_refused(kwargs, message):
    with pytest.raises(VideoError, match=message):
        VideoOptions(**kwargs)


def test_too_small_a_budget_for_the_frames_names_the_fix():
    frames = [np.full((480, 640, 3), i, np.uint8) for i in range(64)]
    with pytest.raises(VideoError, match=r"32 frame pair\(s\) in a budget of 64 tokens.*raise the video token budget"):
        load_video(frames, options=VideoOptions(max_tokens=64, max_frames=64, fps=2.0))


def test_video_without_pyav_names_the_extra(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    (tmp_path / "x.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(VideoError, match=r"pip install 'qwen3-vl-edge\[video\]'"):
        load_video(tmp_path / "x.mp4")


# ---------------------------------------------------------------- edge-chat


def test_edge_chat_answers_about_a_video_and_refuses_bad_options(tiny_f16_dir, tmp_path):
    from click.testing import CliRunner

    from edge_runtime.cli.cli import main

    path = write_video(tmp_path / "cli.mp4")
    fast = ["--max-tokens", "3", "--temperature", "0", "--ctx-size", "1024"]
    run = lambda *args: CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)  # noqa: E731
    result = run(tiny_f16_dir, "--video", path, *fast, "--stats", "What happens?")
    assert result.exit_code == 0, result.output
    assert "(36 image," in result.stderr  # 3 frame pairs x 12 tokens
    result = run(tiny_f16_dir, "--video", path, "--video-fps", "0", *fast, "What happens?")
    assert result.exit_code == 2 and "fps=0.0 is out of range" in result.stderr
    result = run(tiny_f16_dir, "--video", tmp_path / "missing.mp4", *fast, "What happens?")
    assert result.exit_code == 2 and "not found" in result.stderr and "Traceback" not in result.output


# ---------------------------------------------------------------- edge-serve


def test_edge_serve_takes_video_url_parts_under_the_image_policy(tiny_f16_dir, tmp_path):
    import httpx

    from support.server import ServerProcess

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    path = write_video(allowed / "s.mp4")
    write_video(tmp_path / "outside.mp4")
    uri = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()

    def body(url):
        return {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                                          {"type": "text", "text": "What happens?"}]}],
                "max_tokens": 4, "temperature": 0}

    with VisionChat.from_dir(tiny_f16_dir, n_ctx=1024) as chat:
        expected = chat.generate(body(uri)["messages"], max_tokens=4, temperature=0)
        expected_prompt = chat.last_stats.prompt_tokens
    args = ["--ctx-size", "1024", "--threads", "1", "--allow-local-dir", str(allowed)]
    with ServerProcess(tiny_f16_dir, args) as server:
        url = server.url("/v1/chat/completions")
        for source in (uri, str(path)):
            resp = httpx.post(url, json=body(source), timeout=120)
            assert resp.status_code == 200, resp.text
            data = resp.json()
            assert data["choices"][0]["message"]["content"] == expected
            assert data["usage"]["prompt_tokens"] == expected_prompt
        for source, code in ((str(tmp_path / "outside.mp4"), 400), ("data:video/mp4;base64,AAAA", 400)):
            resp = httpx.post(url, json=body(source), timeout=120)
            assert resp.status_code == code and "messages[0].content[0]" in resp.json()["error"]["message"]
        assert httpx.post(url, json=body(uri), timeout=120).status_code == 200  # the server is still serving


def test_a_saved_video_conversation_continues_without_re_encoding(chat, tmp_path):
    path = write_video(tmp_path / "saved.mp4")
    chat.reset()
    chat.ask("What happens?", videos=[path], max_tokens=3, temperature=0)
    first_prompt = chat.last_stats.prompt_tokens
    saved = tmp_path / "conv.bin"
    chat.save(saved)
    expected = chat.ask("And then?", max_tokens=3, temperature=0)  # the reference continuation
    chat.reset()
    chat.engine.encoder_cache.clear()
    chat.restore(saved)
    assert chat.ask("And then?", max_tokens=3, temperature=0) == expected
    assert chat.last_stats.images_encoded == 0 and chat.last_stats.reused_tokens > first_prompt
    chat.reset()


# A ChatML template that renders text and images only (as some third-party GGUFs carry).
_NO_VIDEO_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{%- if m.content is string %}{{ m.content }}{%- else %}{%- for p in m.content %}"
    "{%- if p.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif p.type == 'text' %}{{ p.text }}{%- endif %}{%- endfor %}{%- endif %}<|im_end|>\n"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def test_a_gguf_template_without_videos_falls_back_to_the_family_template(tiny_f16_dir, tmp_path, test_image):
    """The GGUF's own template cannot place a video: the request is rendered with the family's
    template (as for tools) and answered, frames and all; images keep the GGUF's template."""
    import subprocess
    import sys

    folder = tmp_path / "model"
    folder.mkdir()
    text = next(f for f in tiny_f16_dir.glob("*.gguf") if not f.name.startswith("mmproj"))
    mmproj = next(tiny_f16_dir.glob("mmproj*.gguf"))
    # gguf-py's own metadata tool writes the new template
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(text), str(folder / text.name),
                    "--chat-template", _NO_VIDEO_TEMPLATE, "--force"], check=True, capture_output=True)
    path = write_video(tmp_path / "v.mp4")
    with VisionChat(folder / text.name, mmproj, n_ctx=1024) as chat:
        assert chat.template.source == _NO_VIDEO_TEMPLATE
        chat.ask("What happens?", videos=[path], max_tokens=2)
        assert chat.last_stats.images == 3 and chat.last_stats.image_tokens == 3 * 12
        chat.reset()
        chat.ask("What is this?", images=[test_image], max_tokens=2)
        assert chat.last_stats.images == 1
