"""The batches a scheduler step evaluates: tokens of many slots in one llama_decode,
and slices of image embeddings.

Each busy slot contributes its next token, and a slot whose prompt is being
evaluated may add a run of prompt tokens to the same batch (as llama-server
mixes prompt tokens into its decode batch), so a new prompt never stops the
running streams for more than one chunk. Image embeddings cannot share a batch
with tokens (a llama_batch holds either), so they go in slices of their own.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Sequence

import numpy as np

import llama_cpp

from edge_llama import Batch

from ..engine import Engine
from ..errors import DecodeError

_REASONS = {1: "no free KV-cache slot", 2: "aborted", -1: "invalid batch"}


@dataclass(frozen=True)
class Entry:
    seq_id: int
    token: int
    pos: int
    logits: bool


class TokenBatch:
    """Owns a llama_batch with room for `capacity` tokens (one per slot plus a prompt chunk)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._owned = Batch(capacity)
        self._batch = self._owned.raw

    def decode(self, engine: Engine, entries: Sequence[Entry]) -> None:
        """Evaluate the entries; logits of entry i (when asked for) are at batch index i.

        Text tokens carry one position each: llama.cpp spreads it over the M-RoPE sections itself.
        """
        if not 0 < len(entries) <= self.capacity:
            raise ValueError(f"{len(entries)} entries for a batch of {self.capacity}")
        batch = self._batch
        for i, entry in enumerate(entries):
            batch.token[i] = entry.token
            batch.pos[i] = entry.pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = entry.seq_id
            batch.logits[i] = entry.logits
        batch.n_tokens = len(entries)
        with engine.guarded():  # RPC workers: a bounded wait
            rc = llama_cpp.llama_decode(engine.ctx, batch)
        if rc != 0:
            raise DecodeError(f"batched llama_decode of {len(entries)} token(s) failed: "
                              f"{_REASONS.get(rc, 'fatal error')} (code {rc})")

    def close(self) -> None:
        if self._batch is not None:
            self._owned.close()
            self._batch = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def decode_embeddings(engine: Engine, embd: np.ndarray, positions: np.ndarray, start: int, n: int, seq_id: int) -> None:
    """Evaluate image tokens [start, start+n) of one image for `seq_id`.

    `embd` is (n_tokens, n_embd) float32; `positions` is (n_pos_per_embd, n_tokens), section
    by section as llama.cpp reads an embeddings batch (mtmd-helper's decode_embd_batch).
    Points llama.cpp at the arrays themselves: nothing is copied.
    """
    sections = positions.shape[0]
    pos = np.ascontiguousarray(positions[:, start:start + n], dtype=np.int32)  # section-major slice
    rows = np.ascontiguousarray(embd[start:start + n], dtype=np.float32)
    n_seq = np.ones(n, dtype=np.int32)
    seq = np.full(n, seq_id, dtype=np.int32)
    seq_ptrs = (ctypes.POINTER(ctypes.c_int32) * n)(*[seq[i:].ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
                                                      for i in range(n)])
    logits = np.zeros(n, dtype=np.int8)
    batch = llama_cpp.llama_batch()
    batch.n_tokens = n
    batch.token = ctypes.cast(None, ctypes.POINTER(llama_cpp.llama_token))
    batch.embd = rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    batch.pos = pos.reshape(-1).ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos))
    batch.n_seq_id = n_seq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
    batch.seq_id = ctypes.cast(seq_ptrs, ctypes.POINTER(ctypes.POINTER(llama_cpp.llama_seq_id)))
    batch.logits = logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
    assert sections * n == pos.size
    with engine.guarded():
        rc = llama_cpp.llama_decode(engine.ctx, batch)
    if rc != 0:
        raise DecodeError(f"decoding {n} image embedding(s) failed: {_REASONS.get(rc, 'fatal error')} (code {rc})")
