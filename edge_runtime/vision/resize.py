"""Image sizes and pixels the way Hugging Face's Qwen-VL processors make them.

llama.cpp's own resize differs from the processor's (grid choice and filter), which
costs fidelity on every real photo; resizing here to the processor's grid and handing
mtmd an image it need not resize again matches transformers. Small pure functions,
shared by single images and video frames:

    budget = PixelBudget.from_tokens(factor=32, min_tokens=64, max_tokens=256)
    size = target_size(img.size, budget)      # (width, height), HF's smart_resize
    img = draft_for(img, size)                # JPEG: decode at 1/2..1/8 scale when the target allows
    img = resize_to(img, size)                # PIL bicubic (antialiased), as the HF PIL processor
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from edge_runtime.errors import OptionError

__all__ = ["PixelBudget", "draft_for", "resize_rgb", "resize_to", "smart_resize", "smart_resize_video",
           "target_size"]

MAX_ASPECT_RATIO = 200
# A JPEG is decoded at a reduced scale only while it keeps this many times the
# target's pixels per side: the DCT downscale then only replaces the first part
# of the bicubic's antialiasing, and embeddings stay within the parity tolerance.
DRAFT_MARGIN = 2


def smart_resize(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) divisible by `factor`, aspect kept, area within [min_pixels, max_pixels].

    Port of `smart_resize` in transformers' qwen2_vl image processing (used by Qwen3-VL
    with factor = patch_size * merge_size = 32); Python's round() (half to even) as there.
    """
    if height < 1 or width < 1:
        raise OptionError(f"image size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise OptionError(
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


@dataclass(frozen=True)
class PixelBudget:
    """The processor's resize bounds: sides multiples of `factor`, area in [min_pixels, max_pixels]."""

    factor: int
    min_pixels: int
    max_pixels: int

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise OptionError(f"factor must be positive, got {self.factor}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise OptionError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")

    @classmethod
    def from_tokens(cls, *, factor: int, min_tokens: int, max_tokens: int) -> "PixelBudget":
        """One merged token covers factor x factor pixels (llama.cpp's image_min/max_tokens)."""
        area = factor * factor
        return cls(factor, min(min_tokens, max_tokens) * area, max_tokens * area)

    def tokens(self, size: tuple[int, int]) -> int:
        """Merged tokens of an image of `size` (width, height) already on the grid."""
        return (size[0] // self.factor) * (size[1] // self.factor)


def target_size(size: tuple[int, int], budget: PixelBudget) -> tuple[int, int]:
    """(width, height) the HF processor resizes an image of `size` (width, height) to."""
    h, w = smart_resize(size[1], size[0], factor=budget.factor,
                        min_pixels=budget.min_pixels, max_pixels=budget.max_pixels)
    return w, h


def draft_for(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Ask an undecoded JPEG to decode at the smallest DCT scale that keeps DRAFT_MARGIN x `size`.

    A 12 MP photo bound for 512x384 then decodes as 1008x756 and never exists at full
    size. Other formats, and already decoded images, are returned as they are.
    """
    if img.format != "JPEG":
        return img
    want = (size[0] * DRAFT_MARGIN, size[1] * DRAFT_MARGIN)
    if want[0] < img.size[0] and want[1] < img.size[1]:
        img.draft(None, want)  # a no-op once the pixels are decoded
    return img


def resize_to(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """PIL bicubic with antialiasing and no reducing_gap: what the HF PIL processor calls."""
    if img.size == tuple(size):
        return img
    return img.resize(tuple(size), resample=Image.Resampling.BICUBIC)


def smart_resize_video(
    num_frames: int, height: int, width: int, *, temporal_factor: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """One (height, width) for every frame of a clip: the pixel bounds count all frames together.

    Port of `smart_resize` in transformers' qwen3_vl video processing: the frame count,
    rounded to `temporal_factor`, multiplies the area, so a token budget is spread over
    the whole clip.
    """
    if num_frames < temporal_factor:
        raise OptionError(f"{num_frames} frame(s): a clip needs at least {temporal_factor}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise OptionError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {max(height, width) / min(height, width):.1f}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_rgb(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """`resize_to` for an HxWx3 uint8 array (video frames)."""
    if pixels.shape[0] == height and pixels.shape[1] == width:
        return pixels
    return np.asarray(resize_to(Image.fromarray(pixels), (width, height)), dtype=np.uint8)
