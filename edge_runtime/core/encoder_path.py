"""The one encode path: the vision encoder behind both encoder caches (memory and disk).

Whatever runs the encoder (VisionChat's prefill, the server's vision thread, `encode_image`)
comes through `EncoderPath.encode_chunk`, so every output it keeps is written to the memory
cache and to the disk cache alike, and timed for the cost model; whatever reads cached
embeddings comes through `cached` / `known`, which count disk hits once.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edge_llama import LlamaError, Projector

from edge_runtime.core.options import MiB, EngineOptions
from edge_runtime.core.prompt import Chunk, Prompt
from edge_runtime.core.stats import GenerationStats
from edge_runtime.errors import DecodeError, ImageNotCachedError
from edge_runtime.vision.disk_cache import DiskEncoderCache, check_cache_dir, projector_sha256
from edge_runtime.vision.encoder_cache import EncoderCache

log = logging.getLogger("edge_runtime")


class EncoderPath:
    """The encoder's outputs, cached in memory (byte-bounded LRU) and, when configured, on disk.

    `projector` is called for the mtmd context each time (it refuses once the engine is
    closed); `lock` is the engine's mtmd lock; `measured` feeds the cost model with each
    encode's seconds.
    """

    def __init__(self, options: EngineOptions, mmproj_path: Path | None, projector: Callable[[], Projector],
                 lock: threading.RLock, measured: Callable[[str, int, float], None]) -> None:
        self._projector = projector
        self._lock = lock
        self._measured = measured
        self.memory = EncoderCache(int(options.encoder_cache_mb * MiB))
        self.disk: DiskEncoderCache | None = None
        self._disk_hits: set[str] = set()
        if mmproj_path is not None and options.encoder_cache_dir:
            root = Path(options.encoder_cache_dir).expanduser()
            writable = check_cache_dir(root)
            if writable:
                try:
                    root.mkdir(parents=True, exist_ok=True)
                except OSError:
                    writable = False
            if not writable:
                log.warning("encoder cache dir %s is read-only: its entries are used, new ones are not kept", root)
            self.disk = DiskEncoderCache(root, projector_sha256(mmproj_path, root, writable),
                                         int(options.encoder_cache_disk_mb * MiB), writable)

    def cached(self, digest: str) -> np.ndarray | None:
        """Encoder output from memory, else from disk (then kept in memory too)."""
        embd = self.memory.get(digest)
        if embd is None and self.disk is not None and digest:
            embd = self.disk.get(digest)
            if embd is not None:
                embd = embd.reshape(-1)
                self._disk_hits.add(digest)
                self.memory.put(digest, embd)
        return embd

    def discard(self, digest: str) -> None:
        """Forget an entry everywhere (one that does not fill its image's grid): the next ask encodes it."""
        self.memory.discard(digest)
        self._disk_hits.discard(digest)
        if self.disk is not None:
            self.disk.discard(digest)

    def take_disk_hit(self, digest: str) -> bool:
        """Whether `digest`'s embeddings were last read from the disk cache (each read counted once)."""
        if digest in self._disk_hits:
            self._disk_hits.discard(digest)
            return True
        return False

    def encode_chunk(self, chunk: Chunk, keep: bool = False,
                     stop: Callable[[], bool] | None = None) -> tuple[np.ndarray | None, float]:
        """Run the encoder on an image chunk: (flat embeddings, seconds); (None, seconds) when `stop` stopped it.

        `keep`: return a copy even when no cache keeps one (else mtmd's buffer, valid until the
        next encode under the mtmd lock).
        """
        with self._lock:  # also guards mtmd's output buffer until it is used
            return self._encode_locked(chunk, keep, stop)

    def _encode_locked(self, chunk: Chunk, keep: bool,
                       stop: Callable[[], bool] | None) -> tuple[np.ndarray | None, float]:
        digest = chunk.digest or ""
        t0 = time.perf_counter()
        try:
            out = self._projector().encode(chunk.handle, stop=stop, copy=False)
        except LlamaError as exc:
            raise DecodeError(str(exc)) from exc
        seconds = time.perf_counter() - t0
        if out is None:
            return None, seconds
        embd = out.reshape(-1)
        self._measured("encoder", chunk.n_tokens, seconds)
        if keep or (digest and (embd.nbytes <= self.memory.max_bytes or self.disk is not None)):
            embd = embd.copy()
        if digest and embd.nbytes <= self.memory.max_bytes:
            self.memory.put(digest, embd)
        if digest and self.disk is not None:
            self.disk.put(digest, embd)
        return embd, seconds

    def known(self, chunk: Chunk, prompt: Prompt) -> np.ndarray | None:
        """An image chunk's encoder output without encoding (n_tokens x n_embd): pinned when the prompt was
        tokenized, else from the memory cache; None: the encoder must run."""
        digest = chunk.digest or ""
        embd = prompt.embeddings.get(digest)
        if embd is None and digest:
            embd = self.memory.get(digest)
        if embd is None and chunk.placeholder:
            raise ImageNotCachedError(f"image {digest[:12]} has neither pixels nor cached embeddings here: send it "
                                      "again with its pixels (a digest reference only works while the engine "
                                      "still holds that image in its cells or encoder caches)")
        return None if embd is None else np.asarray(embd).reshape(chunk.n_tokens, -1)

    def embedding(self, chunk: Chunk, prompt: Prompt, stats: GenerationStats) -> np.ndarray:
        """An image chunk's encoder output from a cache or the encoder, counted in `stats`."""
        embd = self.known(chunk, prompt)
        if embd is not None:
            stats.encoder_cache_hits += 1
            stats.disk_cache_hits += self.take_disk_hit(chunk.digest or "")
            return embd
        encoded, seconds = self.encode_chunk(chunk, keep=True)
        assert encoded is not None
        stats.image_encode_s += seconds
        stats.images_encoded += 1
        return encoded.reshape(chunk.n_tokens, -1)
