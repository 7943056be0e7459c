"""Images are resized as Qwen3-VL's Hugging Face processor does, so llama.cpp sees what transformers sees.

Expected values come from transformers (its processor and vision tower on the same
checkpoint) and from fixed tables; nothing is computed by the code under test.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from edge_models.qwen3vl.reference import Reference, image_processor
from edge_runtime import VisionChat
from edge_runtime.vision.images import load_image
from edge_runtime.vision.resize import PixelBudget, draft_for, resize_to, smart_resize, target_size
from tests.conftest import make_test_image

FACTOR = 32


# --- the grid: a fixed table (computed by hand from HF's smart_resize definition) -----

@pytest.mark.parametrize("size, tokens, expected", [
    ((640, 480), (64, 16384), (640, 480)),      # already on the grid: unchanged
    ((500, 333), (64, 16384), (512, 320)),      # round to nearest multiple of 32
    ((4032, 3024), (64, 256), (576, 416)),      # floor after scaling to the pixel cap
    ((100, 75), (64, 16384), (320, 224)),       # ceil after scaling up to the pixel floor
    ((48, 48), (1, 16384), (64, 64)),           # 48/32 = 1.5 rounds to 2
    ((80, 80), (1, 16384), (64, 64)),           # 80/32 = 2.5 rounds half to even (2), not up (llama.cpp: 3)
    ((16, 16), (1, 16384), (32, 32)),           # 0.5 rounds to 0: the floor lifts it to one token
])
def test_target_size_follows_hf_smart_resize_rules(size, tokens, expected):
    budget = PixelBudget.from_tokens(factor=FACTOR, min_tokens=tokens[0], max_tokens=tokens[1])
    assert target_size(size, budget) == expected
    # the hand-computed row agrees with the published formula, restated below
    h, w = qwen_vl_smart_resize(size[1], size[0], FACTOR, tokens[0] * FACTOR ** 2, tokens[1] * FACTOR ** 2)
    assert (w, h) == expected


def qwen_vl_smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's smart_resize (qwen-vl-utils, reused by Qwen3-VL's processor), restated here from
    its definition: round each side to the nearest multiple of `factor` (Python's round: half to
    even), then scale both sides down (floor) or up (ceil) by one factor to meet the pixel bounds."""
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def sizes_and_budgets(seed: int, n: int = 500):
    """(height, width, min_tokens, max_tokens) drawn at random, aspect ratios up to 150."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        h, w = (int(x) for x in rng.integers(8, 5000, size=2))
        if max(h, w) / min(h, w) <= 150:
            lo, hi = sorted(int(x) for x in rng.integers(1, 5000, size=2))
            yield h, w, lo, hi


def test_target_size_equals_the_formula_on_many_sizes():
    """Without transformers too: the runtime's resize against the formula restated in this file."""
    for h, w, lo, hi in sizes_and_budgets(1):
        budget = PixelBudget.from_tokens(factor=FACTOR, min_tokens=lo, max_tokens=hi)
        h_bar, w_bar = qwen_vl_smart_resize(h, w, FACTOR, lo * FACTOR ** 2, hi * FACTOR ** 2)
        assert target_size((w, h), budget) == (w_bar, h_bar), (w, h, lo, hi)


@pytest.mark.torch
def test_smart_resize_equals_transformers_on_many_sizes():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    for h, w, lo, hi in sizes_and_budgets(0):
        kw = dict(factor=FACTOR, min_pixels=lo * FACTOR ** 2, max_pixels=hi * FACTOR ** 2)
        assert smart_resize(h, w, **kw) == hf_smart_resize(h, w, **kw)


@pytest.mark.torch
def test_resize_pixels_equal_the_hf_pil_processor():
    """Same pixel values as the processor's resize (before it rescales and normalises)."""
    from transformers.image_transforms import resize
    from transformers.image_utils import PILImageResampling

    img = make_test_image(500, 333, seed=3)
    ours = np.asarray(resize_to(img, (512, 320)))
    theirs = resize(np.asarray(img), (320, 512), resample=PILImageResampling.BICUBIC)
    assert ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


def test_large_jpeg_decodes_at_reduced_scale_and_ends_on_the_grid():
    photo = jpeg_bytes(make_test_image(2016, 1512, seed=5))
    opened = Image.open(io.BytesIO(photo))
    draft_for(opened, (288, 192))
    assert opened.size == (1008, 756), "DCT scaling to 1/2 keeps at least twice the target per side"
    budget = PixelBudget.from_tokens(factor=FACTOR, min_tokens=8, max_tokens=64)
    img = load_image(photo, fit=lambda size: target_size(size, budget))
    assert img.size == (288, 192)


def test_exif_rotated_jpeg_is_sized_upright():
    src = make_test_image(640, 480, seed=6)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: the picture is 480 wide, 640 tall
    data = jpeg_bytes(src, exif=exif.tobytes())
    seen = []

    def fit(size):
        seen.append(size)
        return (size[0] // 64 * 32, size[1] // 64 * 32)

    img = load_image(data, fit=fit)
    assert seen == [(480, 640)]
    assert img.size == (224, 320)


# --- embeddings: transformers' processor + vision tower vs the runtime ----------------

@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return Reference.load(tiny_model_dir)


def hf_embeddings(ref: Reference, model_dir, image: Image.Image, min_tokens: int,
                  max_tokens: int) -> tuple[np.ndarray, tuple[int, int]]:
    """transformers' embeddings of `image` and the token grid (columns, rows) its processor chose."""
    import torch

    processor = image_processor(model_dir)
    size = {"shortest_edge": min_tokens * FACTOR ** 2, "longest_edge": max_tokens * FACTOR ** 2}
    out = processor(images=[image], size=size, return_tensors="pt")
    visual = ref.model.model.visual
    with torch.no_grad():
        res = visual(out["pixel_values"].to(visual.dtype), grid_thw=out["image_grid_thw"])
    main = getattr(res, "pooler_output", None)
    deep = getattr(res, "deepstack_features", None)
    if main is None:
        main, deep = res
    _, rows, cols = (int(v) for v in out["image_grid_thw"][0])  # in patches; a token merges 2 x 2
    merge = processor.merge_size
    return torch.cat([main, *deep], dim=-1).float().numpy(), (cols // merge, rows // merge)


def assert_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    cos = (ours * theirs).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(theirs, axis=-1))
    assert cos.min() >= 0.9999, f"worst token cosine {cos.min():.6f}"
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() <= 5e-3


@pytest.mark.parametrize("size, min_tokens, max_tokens", [
    ((500, 333), 8, 16384),     # default budget, sides not multiples of 32
    ((1000, 700), 8, 96),       # downscaled to a small budget
    ((333, 517), 8, 64),        # portrait, odd sides
    ((90, 70), 32, 16384),      # upscaled to the minimum
])
def test_image_embeddings_match_transformers_at_any_size_and_budget(
    tiny_f32_dir, tiny_model_dir, reference, size, min_tokens, max_tokens
):
    image = make_test_image(*size, seed=sum(size))
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=1024, image_min_tokens=min_tokens,
                             image_max_tokens=max_tokens) as chat:
        encoded = chat.encode_image(image)
    theirs, grid = hf_embeddings(reference, tiny_model_dir, image, min_tokens, max_tokens)
    assert encoded.grid == grid  # the grid transformers' processor chose, not ours recomputed
    assert encoded.n_tokens == grid[0] * grid[1]
    assert_close(encoded.embeddings, theirs)


def test_large_jpeg_through_draft_mode_still_matches_transformers(tiny_f32_dir, tiny_model_dir, reference):
    """A photo decoded at 1/2 scale: within the same tolerance of transformers on the full decode."""
    photo = jpeg_bytes(make_test_image(2016, 1512, seed=8))
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=1024, image_max_tokens=64) as chat:
        encoded = chat.encode_image(photo)
    theirs, grid = hf_embeddings(reference, tiny_model_dir, Image.open(io.BytesIO(photo)).convert("RGB"), 8, 64)
    assert encoded.size == (288, 192) and encoded.grid == grid == (9, 6)
    assert_close(encoded.embeddings, theirs)
