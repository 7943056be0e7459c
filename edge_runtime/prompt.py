"""A rendered prompt tokenized into chunks: text token runs and image token blocks.

Images whose encoder output is already cached are tokenized from a placeholder
bitmap (size only): mtmd then skips preprocessing, and the engine feeds the
cached embeddings instead of running the encoder.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd

from edge_llama import take_errors

from .errors import DecodeError, EmptyPromptError
from .kv_state import Unit, image_unit, text_units


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
            raise ValueError(f"expected an HxWx3 uint8 array, got {pixels.shape} {pixels.dtype}")
        pixels = np.ascontiguousarray(pixels)
        return cls(digest, int(pixels.shape[1]), int(pixels.shape[0]), pixels, plan, source_size, mergeable)


@dataclass(frozen=True)
class Chunk:
    kind: str  # "text" | "image"
    n_tokens: int
    n_pos: int
    tokens: tuple[int, ...] = ()
    digest: str | None = None
    handle: Any = None  # mtmd_input_chunk*, valid while the Prompt is open
    placeholder: bool = False

    def units(self) -> list[Unit]:
        if self.kind == "text":
            return text_units(self.tokens)
        return [image_unit(self.digest or "", self.n_tokens, self.n_pos)]


class Prompt:
    """Owns mtmd's chunk list (if any); close it after evaluation."""

    def __init__(self, chunks: list[Chunk], owner: Any = None) -> None:
        self.chunks = chunks
        self._owner = owner
        self.units: list[Unit] = [u for c in chunks for u in c.units()]
        self.n_tokens = sum(c.n_tokens for c in chunks)
        self.n_image_tokens = sum(c.n_tokens for c in chunks if c.kind == "image")
        self.n_images = sum(1 for c in chunks if c.kind == "image")
        # Cached encoder outputs pinned for this prompt's placeholder images.
        self.embeddings: dict[str, np.ndarray] = {}

    def close(self) -> None:
        if self._owner is not None:
            mtmd.mtmd_input_chunks_free(self._owner)
            self._owner = None

    def __enter__(self) -> "Prompt":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a safety net; callers close explicitly
        try:
            self.close()
        except Exception:
            pass


def token_ids(vocab: Any, text: str, *, add_special: bool) -> list[int]:
    """llama_tokenize with special tokens parsed; `add_special`: BOS (etc.) as the vocab wants them."""
    data = text.encode("utf-8")
    capacity = len(data) + 8
    buf = (llama_cpp.llama_token * capacity)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, capacity, add_special, True)
    if n < 0:
        capacity = -n
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, capacity, add_special, True)
    return list(buf[: max(n, 0)])


def tokenize_text(vocab: Any, text: str) -> Prompt:
    """Tokenize a prompt for a text-only model (special tokens parsed, BOS per vocab)."""
    tokens = tuple(token_ids(vocab, text, add_special=True))
    if not tokens:
        raise EmptyPromptError("the prompt produced no tokens")
    return Prompt([Chunk("text", len(tokens), len(tokens), tokens=tokens)])


def tokenize_multimodal(
    mctx: Any, text: str, images: Sequence[ImageInput], cached: frozenset[str] = frozenset()
) -> Prompt:
    """mtmd_tokenize `text` (one media marker per image) into chunks.

    Images whose digest is in `cached` go in as placeholders (no pixels needed).
    """
    bitmaps = [_bitmap(img, placeholder=img.digest in cached or img.pixels is None) for img in images]
    chunks_p = mtmd.mtmd_input_chunks_init()
    try:
        data = text.encode("utf-8")
        inp = mtmd.mtmd_input_text()
        inp.text = data
        inp.text_len = len(data)  # mtmd reads exactly text_len bytes
        inp.add_special = True
        inp.parse_special = True
        array = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*[b for b, _ in bitmaps])
        take_errors()
        rc = mtmd.mtmd_tokenize(mctx, chunks_p, ctypes.byref(inp), array, len(bitmaps))
        if rc != 0:
            reason = {1: "the number of images does not match the image markers in the prompt",
                      2: "image preprocessing failed"}.get(rc, f"error {rc}")
            detail = "; ".join(take_errors())
            raise DecodeError(f"mtmd_tokenize: {reason}" + (f" ({detail})" if detail else ""))
        placeholders = {img.digest for img, (_, ph) in zip(images, bitmaps) if ph}
        prompt = Prompt(_read_chunks(chunks_p, placeholders), owner=chunks_p)
        chunks_p = None
        return prompt
    finally:
        if chunks_p is not None:
            mtmd.mtmd_input_chunks_free(chunks_p)
        for bitmap, _ in bitmaps:
            mtmd.mtmd_bitmap_free(bitmap)  # mtmd_tokenize copied what it needs


def _bitmap(img: ImageInput, placeholder: bool) -> tuple[Any, bool]:
    data = None
    if not placeholder:
        assert img.pixels is not None
        data = img.pixels.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
    bitmap = mtmd.mtmd_bitmap_init(img.width, img.height, data)
    if not bitmap:
        raise DecodeError(f"mtmd_bitmap_init failed for a {img.width}x{img.height} image")
    mtmd.mtmd_bitmap_set_id(bitmap, img.digest.encode("ascii"))
    if img.mergeable:
        mtmd.mtmd_bitmap_set_mergeable(bitmap, True)
    return bitmap, placeholder


def _read_chunks(chunks_p: Any, placeholders: set[str]) -> list[Chunk]:
    out: list[Chunk] = []
    for i in range(mtmd.mtmd_input_chunks_size(chunks_p)):
        chunk = mtmd.mtmd_input_chunks_get(chunks_p, i)
        kind = mtmd.mtmd_input_chunk_get_type(chunk)
        if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            n = ctypes.c_size_t(0)
            ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
            tokens = tuple(ptr[: n.value]) if n.value else ()
            if tokens:
                out.append(Chunk("text", len(tokens), len(tokens), tokens=tokens, handle=chunk))
        elif kind == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            raw_id = mtmd.mtmd_input_chunk_get_id(chunk)
            digest = raw_id.decode("ascii") if raw_id else ""
            out.append(
                Chunk(
                    "image",
                    int(mtmd.mtmd_input_chunk_get_n_tokens(chunk)),
                    int(mtmd.mtmd_input_chunk_get_n_pos(chunk)),
                    digest=digest,
                    handle=chunk,
                    placeholder=digest in placeholders,
                )
            )
        else:
            raise DecodeError("audio chunks are not supported")
    return out
