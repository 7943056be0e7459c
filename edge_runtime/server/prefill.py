"""A prompt evaluated in pieces between decode steps, and the vision thread beside the loop.

A request's prompt is not evaluated in one go: each scheduler step takes the
next piece (a run of text tokens, or a slice of one image's embeddings) so the
streams already running get a token between pieces. Images are tokenized and
encoded by `VisionWorker`, a thread of its own that alone uses the mtmd
context; ctypes releases the GIL during the C calls, so the encoder runs while
the scheduler thread decodes. Cancellation is checked between pieces and
between images.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..engine import Engine
from ..errors import DecodeError
from ..prompt import Chunk, Prompt
from .jobs import Job

log = logging.getLogger("edge_runtime.server")


@dataclass
class Piece:
    """The next part of a prompt to evaluate."""

    kind: str  # "text" | "image"
    tokens: tuple[int, ...] = ()
    start: int = 0  # image: first token of the slice
    n: int = 0
    final: bool = False  # the prompt's last token: its logits give the first sample


@dataclass
class PrefillWork:
    """How far a slot's prompt has been evaluated; owned by the scheduler thread."""

    job: Job
    prompt: Prompt
    seq_id: int
    keep: int  # leading units already in the KV cache
    chunk: int = 0  # index into prompt.chunks
    offset: int = 0  # tokens of that chunk already evaluated
    positions: np.ndarray | None = None  # of the current image chunk
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # digest -> (n_tokens, n_embd)
    failed: BaseException | None = None  # the vision thread's error
    encoding: bool = False  # the vision thread still holds this prompt's chunks
    abandoned: bool = False  # the scheduler is done with it: the last holder closes the prompt
    lock: threading.Lock = field(default_factory=threading.Lock)

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

    def next_piece(self, budget: int) -> Piece | None:
        """Up to `budget` tokens of what comes next; None while its image is not encoded yet."""
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

    def embedding(self, chunk: Chunk) -> np.ndarray | None:
        with self.lock:
            return self.embeddings.get(chunk.digest or "")

    def advance(self, piece: Piece) -> None:
        """Move past an evaluated piece (the engine recorded it in the sequence's bookkeeping)."""
        chunk = self.current
        assert chunk is not None
        self.offset += len(piece.tokens) if piece.kind == "text" else piece.n
        if self.offset >= chunk.n_tokens:
            self.chunk, self.offset, self.positions = self.chunk + 1, 0, None

    @property
    def done(self) -> bool:
        return self.chunk >= len(self.prompt.chunks)

    def release(self) -> None:
        """The scheduler is done (finished, cancelled or failed); close the prompt unless the vision
        thread still reads its chunks (then it closes it when it stops)."""
        with self.lock:
            self.abandoned = True
            close = not self.encoding
        if close:
            self.prompt.close()


Task = tuple[int, int, Callable[[], None]]  # (priority, order, work)


class VisionWorker:
    """One thread owning the mtmd context: tokenizes prompts with images, encodes images.

    Tokenizing comes before encoding in its queue, so a new request's prompt is
    ready for slot choice while another request's images are still being encoded.
    """

    TOKENIZE, ENCODE = 0, 1

    def __init__(self, engine: Engine, notify: Callable[[], None]) -> None:
        self._engine = engine
        self._notify = notify
        self._queue: queue.PriorityQueue[Task] = queue.PriorityQueue()
        self._order = 0
        self._stopped = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="edge-vision", daemon=True)
        self._thread.start()
        self.encode_seconds = 0.0
        self.stopped_encodes = 0  # encodes stopped midway because their request went away

    def _put(self, priority: int, work: Callable[[], None]) -> None:
        with self._lock:
            self._order += 1
            self._queue.put((priority, self._order, work))

    def tokenize(self, job: Job, done: Callable[[Job, Prompt | None, BaseException | None], None]) -> None:
        """Tokenize job's prompt with its images (cached encoder outputs as placeholders)."""

        def work() -> None:
            if job.cancelled:
                done(job, None, None)
                return
            try:
                prompt = self._engine.tokenize(job.prompt_text, job.images)
            except BaseException as exc:  # reported to the client by the scheduler
                done(job, None, exc)
                return
            done(job, prompt, None)

        self._put(self.TOKENIZE, work)

    def encode(self, prefill: PrefillWork, chunks: list[Chunk]) -> None:
        """Encode `chunks` (image chunks with pixels) in order into prefill.embeddings."""
        with prefill.lock:
            prefill.encoding = True

        def gone() -> bool:
            return prefill.job.cancelled or prefill.abandoned

        def work() -> None:
            try:
                for chunk in chunks:
                    if gone():
                        break  # a disconnect stops the work between images, and within one (below)
                    embd = self._encode(chunk, gone)
                    if embd is None:
                        break
                    with prefill.lock:
                        prefill.embeddings[chunk.digest or ""] = embd
                    self._notify()
            except BaseException as exc:
                with prefill.lock:
                    prefill.failed = exc
                self._notify()
            finally:
                with prefill.lock:
                    prefill.encoding = False
                    close = prefill.abandoned
                if close:
                    prefill.prompt.close()

        self._put(self.ENCODE, work)

    def _encode(self, chunk: Chunk, gone: Callable[[], bool]) -> np.ndarray | None:
        """The chunk's embeddings through the engine's one encode path (memory and disk caches, cost
        model); None when the request went away mid-encode (the graph was stopped)."""
        embd, seconds = self._engine.encode_chunk(chunk, keep=True, stop=gone)
        self.encode_seconds += seconds
        if embd is None:
            self.stopped_encodes += 1
            return None
        return embd.reshape(chunk.n_tokens, self._engine.n_embd_inp)

    def stop(self) -> None:
        self._stopped = True
        self._put(-1, lambda: None)  # wake it; a running encode finishes first (the thread is a daemon)

    def _run(self) -> None:
        while True:
            _, _, work = self._queue.get()
            if self._stopped:
                return
            try:
                work()
            except BaseException:  # a task reports its own errors; never let the thread die
                log.exception("vision worker task failed")
            self._notify()


def missing_images(prefill: PrefillWork, cache_get: Callable[[str], Any]) -> list[Chunk]:
    """Image chunks still to evaluate whose embeddings are neither pinned nor cached (to encode)."""
    out = []
    for chunk in prefill.prompt.chunks[prefill.chunk:]:
        if chunk.kind != "image":
            continue
        digest = chunk.digest or ""
        embd = prefill.prompt.embeddings.get(digest)
        if embd is None:
            embd = cache_get(digest) if digest else None
        if embd is not None:
            prefill.embeddings[digest] = np.asarray(embd).reshape(chunk.n_tokens, -1)
        elif chunk.placeholder:
            raise DecodeError(f"image {digest[:12]} has neither pixels nor cached embeddings")
        else:
            out.append(chunk)
    return out
