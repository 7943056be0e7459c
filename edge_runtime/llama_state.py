"""The one place that copies a sequence's KV cells out of and into a llama context.

llama.cpp serialises a sequence (cell positions, M-RoPE extras, K and V rows)
with `llama_state_seq_get_data` and reads it back with `_set_data`, which
checks layer count, types and row sizes and clears the destination first.
"""
from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp


def seq_state_bytes(ctx: Any, seq_id: int) -> bytearray:
    """The serialised KV cells of `seq_id`, written straight into a bytearray (hundreds of MB: one copy)."""
    size = int(llama_cpp.llama_state_seq_get_size(ctx, seq_id))
    data = bytearray(size)
    buf = (ctypes.c_uint8 * size).from_buffer(data)
    written = int(llama_cpp.llama_state_seq_get_data(ctx, buf, size, seq_id))
    del buf  # release the export so the bytearray may be resized/freed
    if written != size:
        raise RuntimeError(f"llama_state_seq_get_data wrote {written} of {size} bytes for sequence {seq_id}")
    return data


def load_seq_state(ctx: Any, seq_id: int, data: bytearray) -> bool:
    """Replace `seq_id`'s cells with `data`; False when llama.cpp refuses it (the sequence is then empty)."""
    buf = (ctypes.c_uint8 * len(data)).from_buffer(data)
    try:
        return int(llama_cpp.llama_state_seq_set_data(ctx, buf, len(data), seq_id)) > 0
    finally:
        del buf


def seq_pos_range(ctx: Any, seq_id: int) -> tuple[int, int]:
    """(min, max) position held by `seq_id`; (-1, -1) when it is empty."""
    mem = llama_cpp.llama_get_memory(ctx)
    return int(llama_cpp.llama_memory_seq_pos_min(mem, seq_id)), int(llama_cpp.llama_memory_seq_pos_max(mem, seq_id))
