"""A clip through llama.cpp must compute what transformers' Qwen3-VL video path computes.

The expected side is transformers' own code: `Qwen3VLProcessor.replace_video_token`
(timestamps and per-group vision blocks), `Qwen3VLVideoProcessor.patchify` and the
model's forward with `pixel_values_videos` / `video_grid_thw` (M-RoPE per group). The
processor class itself needs torchvision, which this environment's CPU torch cannot
load, so its pieces are called directly; the placeholder triple is replaced whole, as
transformers 4.57 (Qwen's reference) and vLLM do.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from edge_models.qwen3vl.reference import Reference
from edge_runtime import VisionChat
from edge_runtime.chat.messages import split_messages, videos_in
from edge_runtime.core.template import VIDEO_PLACEHOLDER, render_with_markers

QUESTION = "What happens in this clip?"
TOL = 1e-2


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return Reference.load(tiny_model_dir)


@pytest.fixture(scope="module")
def exact_chat(tiny_f32_dir):
    # f32 KV and no flash attention: the exact path, as in test_parity.py.
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=2048, kv_cache_type="f32", flash_attn=False) as chat:
        yield chat


def clip(pairs_equal: bool, n_frames: int = 8, height: int = 96, width: int = 128) -> np.ndarray:
    """Frames with structure (gradients and blocks that move); sides are multiples of 32."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:height, 0:width]
    frames = []
    for t in range(n_frames):
        k = t // 2 if pairs_equal else t
        f = np.stack([(xx * 2 + 20 * k) % 256, (yy * 3 + 11 * k) % 256, ((xx + yy) * 5 + 37 * k) % 256], -1)
        x0 = (10 * k) % (width - 24)
        f[20:44, x0 : x0 + 24] = rng.integers(0, 256, 3) if not pairs_equal else (200, 30, 90)
        frames.append(f.astype(np.uint8))
    return np.stack(frames)


def hf_inputs(ref: Reference, frames: np.ndarray, fps: float, template):
    """input_ids, pixel_values_videos, video_grid_thw, mm_token_type_ids as transformers builds them."""
    import torch
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    vision = ref.config["vision_config"]
    pre = ref.processor
    vp = Qwen3VLVideoProcessor(patch_size=vision["patch_size"], temporal_patch_size=2,
                               merge_size=vision["spatial_merge_size"])
    mean = torch.tensor(pre.image_mean).view(1, 1, 3, 1, 1)
    std = torch.tensor(pre.image_std).view(1, 1, 3, 1, 1)
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)[None].float() / 255.0
    patches, gt, gh, gw = vp.patchify((video - mean) / std, vp.patch_size, vp.merge_size, vp.temporal_patch_size)
    grid = torch.tensor([[gt, gh, gw]])
    metadata = VideoMetadata(total_num_frames=len(frames), fps=fps, frames_indices=list(range(len(frames))))
    proc = SimpleNamespace(
        video_processor=vp, video_token="<|video_pad|>", vision_start_token="<|vision_start|>",
        vision_end_token="<|vision_end|>",
        _calculate_timestamps=lambda *a: Qwen3VLProcessor._calculate_timestamps(None, *a),
    )
    expansion = Qwen3VLProcessor.replace_video_token(proc, {"video_grid_thw": grid, "video_metadata": [metadata]}, 0)
    # The chat template's text around the clip is the same on both sides (the fixture's template).
    text = template.render([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}])
    assert text.count(VIDEO_PLACEHOLDER) == 1
    text = text.replace(VIDEO_PLACEHOLDER, expansion)
    ids = ref.tokenize(text)
    video_id = ref.config["video_token_id"]
    mm = torch.tensor([[2 if i == video_id else 0 for i in ids]])
    return ids, patches[0], grid, mm, text


def ours(chat: VisionChat, frames: np.ndarray, video_id: int) -> tuple[list[int], np.ndarray, str]:
    """Our prompt ids (each frame group expanded to video pads) and last-token logits."""
    messages = [{"role": "user", "content": [{"type": "video", "video": list(frames)}, {"type": "text", "text": QUESTION}]}]
    template_messages, images = split_messages(messages, load_video=chat.load_video)
    text = render_with_markers(chat.template, template_messages, len(images), chat.engine.marker,
                               videos_in(template_messages))
    chat.engine.reset()
    with chat.engine.tokenize(text, images) as prompt:
        ids: list[int] = []
        for chunk in prompt.chunks:
            ids += list(chunk.tokens) if chunk.kind == "text" else [video_id] * chunk.n_tokens
        chat.engine.prefill(prompt)
    logits = chat.engine.context.logits(-1)
    chat.engine.reset()
    return ids, logits, text


@pytest.mark.parametrize("pairs_equal", [True, False], ids=["equal-pairs", "distinct-frames"])
def test_video_prompt_and_logits_match_transformers(reference, exact_chat, pairs_equal):
    import torch

    frames = clip(pairs_equal)
    fps = exact_chat.video.fps  # a frame list is taken as sampled at `fps`: frame i at i / fps seconds
    hf_ids, pixels, grid, mm, hf_text = hf_inputs(reference, frames, fps, exact_chat.template)
    our_ids, our_logits, our_text = ours(exact_chat, frames, reference.config["video_token_id"])
    assert "<0.2 seconds>" in hf_text and "<1.2 seconds>" in hf_text  # (0 + 0.5) / 2, (2 + 2.5) / 2: not trivially empty
    assert our_ids == hf_ids, "prompt token ids (timestamps, vision start/end, pads) must be identical"
    with torch.no_grad():
        out = reference.model(input_ids=torch.tensor([hf_ids]), pixel_values_videos=pixels, video_grid_thw=grid,
                              mm_token_type_ids=mm)
    theirs = out.logits[0, -1].float().numpy()
    ours_v = our_logits[: theirs.shape[0]]
    assert np.abs(theirs).max() > 1.0, "fixture logits should have a useful magnitude"
    assert np.abs(ours_v - theirs).max() < TOL
    assert ours_v.argmax() == theirs.argmax()


def test_one_frame_per_group_is_not_what_transformers_computes(reference, exact_chat):
    """The distinct-frame parity above is not vacuous: dropping each group's second frame
    (what an image-only path would do) moves the logits measurably."""
    import torch

    frames = clip(pairs_equal=False)
    hf_ids, pixels, grid, mm, _ = hf_inputs(reference, frames, exact_chat.video.fps, exact_chat.template)
    approx = frames.copy()
    approx[1::2] = approx[0::2]
    _, approx_logits, _ = ours(exact_chat, approx, reference.config["video_token_id"])
    with torch.no_grad():
        theirs = reference.model(input_ids=torch.tensor([hf_ids]), pixel_values_videos=pixels, video_grid_thw=grid,
                                 mm_token_type_ids=mm).logits[0, -1].float().numpy()
    assert np.abs(approx_logits[: theirs.shape[0]] - theirs).max() > 10 * TOL
