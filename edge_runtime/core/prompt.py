"""A rendered prompt tokenized into chunks: text token runs and image token blocks.

Images whose encoder output is already cached are tokenized from a placeholder
bitmap (size only): mtmd then skips preprocessing, and the engine feeds the
cached embeddings instead of running the encoder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from edge_llama import Bitmap, Chunks, LlamaError, Model, Projector, chunk_info

from edge_runtime.errors import DecodeError, EmptyPromptError
from edge_runtime.core.kv_state import Unit, image_unit, text_units
from edge_runtime.vision.image_input import ImageInput


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

    def __init__(self, chunks: list[Chunk], owner: Chunks | None = None) -> None:
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
            self._owner.close()
            self._owner = None

    def __enter__(self) -> "Prompt":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a safety net; callers close explicitly
        try:
            self.close()
        # catching Exception: __del__ must not raise (Python only prints it); close() is called explicitly on every normal path
        except Exception:
            pass


def tokenize_text(model: Model, text: str) -> Prompt:
    """Tokenize a prompt for a text-only model (special tokens parsed, BOS per vocab)."""
    tokens = tuple(model.tokenize(text, add_special=True))
    if not tokens:
        raise EmptyPromptError("the prompt produced no tokens")
    return Prompt([Chunk("text", len(tokens), len(tokens), tokens=tokens)])


def tokenize_multimodal(
    projector: Projector, text: str, images: Sequence[ImageInput], cached: frozenset[str] = frozenset()
) -> Prompt:
    """Tokenize `text` (one media marker per image) into chunks.

    Images whose digest is in `cached` go in as placeholders (no pixels needed).
    """
    placeholders = {img.digest for img in images if img.digest in cached or img.pixels is None}
    try:
        bitmaps = [Bitmap(None if img.digest in placeholders else img.pixels, img.digest,
                          size=(img.width, img.height), mergeable=img.mergeable) for img in images]
        chunks = projector.tokenize(text, bitmaps)
    except LlamaError as exc:
        raise DecodeError(str(exc)) from exc
    try:
        return Prompt(_read_chunks(chunks, placeholders), owner=chunks)
    except BaseException:
        chunks.close()
        raise


def _read_chunks(chunks: Chunks, placeholders: set[str]) -> list[Chunk]:
    out: list[Chunk] = []
    for handle in chunks:
        info = chunk_info(handle)
        if info.kind == "text":
            if info.tokens:
                out.append(Chunk("text", info.n_tokens, info.n_pos, tokens=info.tokens, handle=handle))
        elif info.kind == "image":
            out.append(Chunk("image", info.n_tokens, info.n_pos, digest=info.id, handle=handle,
                             placeholder=info.id in placeholders))
        else:
            raise DecodeError("audio chunks are not supported")
    return out


@dataclass
class Piece:
    """The next part of a prompt to evaluate: a run of text tokens, or a slice of one image's tokens."""

    kind: str  # "text" | "image"
    tokens: tuple[int, ...] = ()
    start: int = 0  # image: first token of the slice
    n: int = 0  # image: tokens in the slice
    final: bool = False  # the prompt's last token: its logits give the first sample


@dataclass
class PromptCursor:
    """How far a sequence's prompt has been evaluated, in pieces: VisionChat's prefill takes them one
    after the other, the server's scheduler one per step between the other slots' tokens."""

    prompt: Prompt
    seq_id: int
    keep: int  # leading units already in the KV cache
    chunk: int = 0  # index into prompt.chunks
    offset: int = 0  # tokens of that chunk already evaluated
    positions: np.ndarray | None = None  # decoder positions of the current image chunk
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # digest -> (n_tokens, n_embd)

    def __post_init__(self) -> None:
        self.skip_cached()

    def skip_cached(self) -> None:
        """Move past the chunks whose units the KV cache already holds."""
        unit = 0
        for i, chunk in enumerate(self.prompt.chunks):
            n_units = len(chunk.tokens) if chunk.kind == "text" else 1
            if unit + n_units > self.keep:
                self.chunk, self.offset = i, max(0, self.keep - unit)
                return
            unit += n_units
        self.chunk, self.offset = len(self.prompt.chunks), 0

    @property
    def current(self) -> Chunk | None:
        return self.prompt.chunks[self.chunk] if self.chunk < len(self.prompt.chunks) else None

    @property
    def done(self) -> bool:
        return self.chunk >= len(self.prompt.chunks)

    def embedding(self, chunk: Chunk) -> np.ndarray | None:
        return self.embeddings.get(chunk.digest or "")

    def next_piece(self, budget: int) -> Piece | None:
        """Up to `budget` tokens of what comes next; None while its image has no embeddings yet."""
        chunk = self.current
        if chunk is None:
            raise DecodeError("the prompt is already evaluated")
        last = self.chunk == len(self.prompt.chunks) - 1
        if chunk.kind == "text":
            tokens = chunk.tokens[self.offset:self.offset + budget]
            return Piece("text", tokens, final=last and self.offset + len(tokens) == len(chunk.tokens))
        if self.embedding(chunk) is None:
            return None
        return Piece("image", start=self.offset, n=min(budget, chunk.n_tokens - self.offset))

    def advance(self, piece: Piece) -> None:
        """Move past an evaluated piece (the engine recorded it in the sequence's bookkeeping)."""
        chunk = self.current
        assert chunk is not None
        self.offset += len(piece.tokens) if piece.kind == "text" else piece.n
        if self.offset >= chunk.n_tokens:
            self.chunk, self.offset, self.positions = self.chunk + 1, 0, None
