"""Image sizes the way Hugging Face's Qwen-VL processors choose them.

llama.cpp's own resize differs from the processor's (grid choice and filter), which
costs fidelity on every real photo; resizing here to the processor's grid and handing
mtmd an image it need not resize again matches transformers. Shared by single images
and video frames.
"""
from __future__ import annotations

import math

__all__ = ["smart_resize"]

MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) divisible by `factor`, aspect kept, area within [min_pixels, max_pixels].

    Port of `smart_resize` in transformers' qwen2_vl image processing (used by Qwen3-VL
    with factor = patch_size * merge_size = 32).
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {max(height, width) / min(height, width):.1f}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar
