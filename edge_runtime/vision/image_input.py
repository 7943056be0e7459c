"""The one form every image and video frame takes on its way to the projector.

It lives with the vision room, below the core: images, video and the budgets build it, the
core's prompts carry it, and nothing here needs llama.cpp.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from edge_runtime.vision.images import ImageError


@dataclass(frozen=True)
class ImageInput:
    """An image ready for mtmd: RGB pixels (HxWx3 uint8) and their content hash.

    `plan` and `source_size` say which budget resized it from what size (None when
    the caller built it from pixels directly).
    `mergeable` marks a video frame: mtmd merges two adjacent mergeable frames of one
    size into one temporal group (the pair shares its digest, the group's cache key).
    """

    digest: str
    width: int
    height: int
    pixels: np.ndarray | None = field(default=None, repr=False, compare=False)
    plan: Any = field(default=None, compare=False)
    source_size: tuple[int, int] | None = field(default=None, compare=False)
    mergeable: bool = False

    @classmethod
    def from_array(cls, pixels: np.ndarray, digest: str, plan: Any = None,
                   source_size: tuple[int, int] | None = None, mergeable: bool = False) -> "ImageInput":
        """Wrap pixels already resized for the projector; `digest` keys the encoder caches, so it
        must change whenever the pixels do."""
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            raise ImageError(f"expected an HxWx3 uint8 array, got {pixels.shape} {pixels.dtype}")
        pixels = np.ascontiguousarray(pixels)
        return cls(digest, int(pixels.shape[1]), int(pixels.shape[0]), pixels, plan, source_size, mergeable)


