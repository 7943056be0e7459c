"""The two kinds of llama_batch: tokens, and embeddings (an image's encoder output).

A llama_batch holds either token ids or embedding rows, never both, so an
image's tokens go in batches of their own. Both are evaluated by
`Context.decode_batch`, the one llama_decode call of the project.
"""
from __future__ import annotations

import ctypes
from typing import Iterable, Sequence

import numpy as np
import llama_cpp as L

from .errors import LlamaError
from .owned import Closeable, Owned


class Batch(Owned):
    """A llama_batch of up to `capacity` tokens, each on one sequence; `raw` is the C struct."""

    what = "token(s)"

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.raw = L.llama_batch_init(capacity, 0, 1)
        self.ptr = True  # llama_batch is returned by value: ownership is tracked by a flag

    def _free(self) -> None:
        L.llama_batch_free(self.raw)

    def fill(self, tokens: Sequence[int], pos0: int, seq: int = 0, *, logits: str = "last") -> None:
        """tokens at positions pos0.. of one sequence; logits for "last", "all" or "none" of them."""
        n = len(tokens)
        self.put((seq, tok, pos0 + i, logits == "all" or (logits == "last" and i == n - 1))
                 for i, tok in enumerate(tokens))

    def put(self, entries: Iterable[tuple[int, int, int, bool]]) -> int:
        """(seq, token, pos, logits) entries, e.g. the next token of many sequences; logits of
        entry i (when asked for) are output i. Returns the number of entries."""
        b, n = self.raw, 0
        for n, (seq, token, pos, want) in enumerate(entries, 1):
            if n > self.capacity:
                raise LlamaError(f"more than {self.capacity} tokens for a batch of {self.capacity}")
            i = n - 1
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, bool(want)
            b.seq_id[i][0] = seq
        b.n_tokens = n
        return n


class EmbeddingBatch(Closeable):
    """Rows of an image's embeddings for one sequence, as mtmd-helper's decode_embd_batch builds them.

    llama.cpp points at the arrays themselves (nothing is copied): `positions` is
    (sections, n) section by section, as llama.cpp reads an embeddings batch
    (M-RoPE: t, y, x, z per token; one running position otherwise). The arrays
    stay referenced here until the next `set` or `close`.
    """

    what = "image embedding(s)"

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.raw = L.llama_batch()
        self._n_seq = np.ones(capacity, dtype=np.int32)
        self._seq = np.zeros(capacity, dtype=np.int32)
        self._seq_ptrs = (ctypes.POINTER(ctypes.c_int32) * capacity)(
            *[self._seq[i:].ctypes.data_as(ctypes.POINTER(ctypes.c_int32)) for i in range(capacity)])
        self._logits = np.zeros(capacity, dtype=np.int8)
        self._held: tuple = ()

    def set(self, rows: np.ndarray, positions: np.ndarray, seq: int = 0) -> None:
        n = int(rows.shape[0])
        if not 0 < n <= self.capacity or positions.shape[1] != n:
            raise LlamaError(f"{n} embedding rows ({positions.shape[1]} positions) for a batch of {self.capacity}")
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        pos = np.ascontiguousarray(positions, dtype=np.int32)  # section-major
        self._seq[:n] = seq
        b = self.raw
        b.n_tokens = n
        b.token = ctypes.cast(None, ctypes.POINTER(L.llama_token))
        b.embd = rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        b.pos = pos.reshape(-1).ctypes.data_as(ctypes.POINTER(L.llama_pos))
        b.n_seq_id = self._n_seq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.seq_id = ctypes.cast(self._seq_ptrs, ctypes.POINTER(ctypes.POINTER(L.llama_seq_id)))
        b.logits = self._logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self._held = (rows, pos)

    def close(self) -> None:
        self._held = ()
