"""One llama_decode for the next token of every active slot.

`Engine.decode_tokens` evaluates one sequence at a time; a server with N busy
slots would pay N passes over the weights per step. `TokenBatch` puts one
token per sequence into a single batch (their logits at batch indices
0..n-1) and keeps the engine's per-sequence bookkeeping in step.
"""
from __future__ import annotations

from typing import Sequence

import llama_cpp

from edge_llama import Batch

from ..engine import Engine
from ..errors import DecodeError
from ..kv_state import text_units


class TokenBatch:
    """Owns a llama_batch with room for one token per slot."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._owned = Batch(capacity)
        self._batch = self._owned.raw

    def decode(self, engine: Engine, entries: Sequence[tuple[int, int]]) -> None:
        """Evaluate (seq_id, token) pairs; logits of entry i are at batch index i.

        Text tokens carry one position each: llama.cpp spreads it over the
        M-RoPE sections itself, and a sequence's next position already accounts
        for its images (SeqState.n_pos).
        """
        if not 0 < len(entries) <= self.capacity:
            raise ValueError(f"{len(entries)} entries for a batch of {self.capacity}")
        batch = self._batch
        for i, (seq_id, token) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = engine.seq_state(seq_id).n_pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq_id
            batch.logits[i] = 1
        batch.n_tokens = len(entries)
        with engine.guarded():  # RPC workers: a bounded wait
            rc = llama_cpp.llama_decode(engine.ctx, batch)
        if rc != 0:
            for seq_id, _ in entries:  # cells of a failed batch may be half-written: drop these sequences
                engine.reset(seq_id)
            reason = {1: "no free KV-cache slot", 2: "aborted", -1: "invalid batch"}.get(rc, "fatal error")
            raise DecodeError(f"batched llama_decode of {len(entries)} token(s) failed: {reason} (code {rc})")
        for seq_id, token in entries:
            engine.seq_state(seq_id).append(text_units((token,))[0])

    def close(self) -> None:
        if self._batch is not None:
            self._owned.close()
            self._batch = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
