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
from typing import Callable

import numpy as np

from edge_runtime.core.engine import Engine
from edge_runtime.core.prompt import Chunk, Prompt, PromptCursor
from .jobs import Job

log = logging.getLogger("edge_runtime.server")


@dataclass
class PrefillWork(PromptCursor):
    """A slot's prompt cursor shared with the vision thread, which fills `embeddings` as it encodes;
    owned by the scheduler thread."""

    job: Job | None = None
    failed: BaseException | None = None  # the vision thread's error
    encoding: bool = False  # the vision thread still holds this prompt's chunks
    abandoned: bool = False  # the scheduler is done with it: the last holder closes the prompt
    lock: threading.Lock = field(default_factory=threading.Lock)

    def embedding(self, chunk: Chunk) -> np.ndarray | None:
        with self.lock:
            return self.embeddings.get(chunk.digest or "")

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
            return prefill.abandoned or (prefill.job is not None and prefill.job.cancelled)

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


def missing_images(prefill: PrefillWork, engine: Engine) -> list[Chunk]:
    """Image chunks still to evaluate whose embeddings are neither pinned nor cached (to encode)."""
    out = []
    for chunk in prefill.prompt.chunks[prefill.chunk:]:
        if chunk.kind != "image":
            continue
        embd = engine.known_embedding(chunk, prefill.prompt)
        if embd is not None:
            prefill.embeddings[chunk.digest or ""] = embd
        else:
            out.append(chunk)
    return out
