"""The KV cache's sequences: what each holds, what it costs in memory, and its cells saved and restored.

The bookkeeping (`SeqState` per sequence id) always matches the KV cells: every removal goes
through `truncate` / `reset` here, which also remove the cells, and an import that llama.cpp
refuses leaves the sequence as it was.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Sequence

from edge_llama import FLASH_ATTN_OFF, Context, kv_type, log_suffix

from edge_common.manifest import file_sha256
from edge_runtime.core.kv_state import SeqState, StateFingerprint, Unit, flash_attn_layout
from edge_runtime.core.options import EngineOptions
from edge_runtime.errors import SavedConversationError


class Sequences:
    """Bookkeeping of the `n_seq_max` sequences of one llama context of `n_ctx` cells.

    `context` is called for the llama context each time (it refuses once the engine is closed).
    """

    def __init__(self, context: Callable[[], Context], n_seq_max: int, n_ctx: int, kv_token_bytes: int) -> None:
        self._context = context
        self.n_seq_max = n_seq_max
        self.n_ctx = n_ctx
        self.kv_token_bytes = kv_token_bytes
        self._seqs: dict[int, SeqState] = {}

    def __getitem__(self, seq_id: int) -> SeqState:
        if not 0 <= seq_id < self.n_seq_max:
            # a plain ValueError: seq ids come from the slot table: a programming error
            raise ValueError(f"seq_id {seq_id} outside [0, n_seq_max={self.n_seq_max})")
        return self._seqs.setdefault(seq_id, SeqState())

    def truncate(self, seq_id: int, keep: int) -> None:
        """Keep the first `keep` units of `seq_id` (cells past them, even half-written, go)."""
        state = self[seq_id]
        pos = state.truncate(keep)
        ctx = self._context()
        if not ctx.seq_rm(seq_id, pos, -1):
            # only partial removal can fail (recurrent memory): drop the whole sequence
            ctx.seq_rm(seq_id, -1, -1)
            state.clear()

    def copy(self, src: int, dst: int) -> None:
        """Make `dst` hold what `src` holds (an evaluated prompt that several answers continue):
        llama.cpp shares the cells, so the copy costs no compute and no KV memory until the two
        sequences diverge."""
        ctx = self._context()
        ctx.seq_rm(dst, -1, -1)
        ctx.seq_cp(src, dst)
        self[dst].copy_from(self[src])

    def reset(self, seq_id: int) -> None:
        """Forget `seq_id` (its KV cells are freed)."""
        self._context().seq_rm(seq_id, -1, -1)
        self[seq_id].clear()

    # ------------------------------------------------------------ KV accounting

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes allocated for K and V (n_ctx cells)."""
        return self.kv_token_bytes * self.n_ctx

    def kv_used_bytes(self, seq_id: int | None = None) -> int:
        """KV bytes holding one sequence (all of them with None)."""
        seqs = self._seqs.values() if seq_id is None else [self[seq_id]]
        return self.kv_token_bytes * sum(s.n_tokens for s in seqs)

    # ------------------------------------------------------------ saved sequences

    def export(self, seq_id: int) -> tuple[list[Unit], bytearray]:
        """The units `seq_id` holds and llama.cpp's serialised cells of it."""
        return list(self[seq_id].units), self._context().seq_state_bytes(seq_id)

    def import_(self, seq_id: int, units: Sequence[Unit], data: bytearray) -> None:
        """Put exported cells into `seq_id` and take `units` as its bookkeeping.

        A refused import (llama.cpp's own checks, or cells that do not cover the units) puts back
        what `seq_id` held, so the conversation there goes on as if nothing was tried: its cells
        are copied out first (a restore is rare; the copy is one sequence's KV bytes).
        """
        ctx = self._context()
        state = self[seq_id]
        held = (list(state.units), ctx.seq_state_bytes(seq_id)) if state.units else None
        state.clear()
        try:
            if not ctx.load_seq_state(seq_id, data):
                raise SavedConversationError(
                    "llama.cpp refused the saved KV cells (another layer count, KV type, or flash-attention "
                    "setting, which changes the V layout)" + log_suffix())
            state.extend(units)
            lo, hi = ctx.seq_pos_range(seq_id)
            if (lo, hi) != ((0, state.n_pos - 1) if units else (-1, -1)):  # no units: no cells either
                raise SavedConversationError(
                    f"the saved KV cells cover positions {lo}..{hi} but the saved units need 0..{state.n_pos - 1}")
        except BaseException:
            ctx.seq_rm(seq_id, -1, -1)
            state.clear()
            if held is not None and ctx.load_seq_state(seq_id, held[1]):
                state.extend(held[0])
            else:
                ctx.seq_rm(seq_id, -1, -1)
            raise

def fingerprint(options: EngineOptions, model_path: Path, mmproj_path: Path | None, arch: str, flash_attn_type: int,
                chat_template: str) -> StateFingerprint:
    """What an engine's KV cells depend on (the model files are hashed once per process)."""
    return StateFingerprint(
        model_sha256=file_sha256(model_path),
        mmproj_sha256=file_sha256(mmproj_path) if mmproj_path else None,
        arch=arch,
        kv_type_k=kv_type(options.kv_cache_type_k).name,
        kv_type_v=kv_type(options.kv_cache_type_v).name,
        image_min_tokens=options.image_min_tokens,
        image_max_tokens=options.image_max_tokens,
        kv_streams=options.n_seq_max,
        flash_attn=flash_attn_layout(flash_attn_type, FLASH_ATTN_OFF),
        chat_template=hashlib.sha256(chat_template.encode("utf-8")).hexdigest(),
    )
