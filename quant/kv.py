"""KV-cache types llama.cpp accepts (common/arg.cpp kv_cache_types) and what they cost.

The cache holds, per layer and per context cell, one K row and one V row of
n_head_kv * head_dim values each, stored as ggml rows of the chosen type.
The type table is edge_llama's (one for the runtime and quant); this module
adds the whole-cache arithmetic. llama.cpp rounds the context up to 256 cells.
"""
from __future__ import annotations

from edge_llama.kv import KV_TYPES, KVType as KvType, kv_type as _kv_type
from edge_llama.errors import KVTypeError

from .errors import QuantError

CTX_PAD = 256  # llama_context pads n_ctx to a multiple of this

__all__ = ["CTX_PAD", "KV_TYPES", "KvType", "kv_bytes", "kv_bytes_for_rows", "kv_bytes_per_token", "kv_type",
           "padded_ctx"]


def kv_type(name: str) -> KvType:
    """edge_llama's table; an unknown name is a QuantError here, like every quant option."""
    try:
        return _kv_type(name)
    except KVTypeError as exc:
        raise QuantError(str(exc)) from None


def padded_ctx(n_ctx: int) -> int:
    return -(-int(n_ctx) // CTX_PAD) * CTX_PAD


def kv_bytes_per_token(n_layer: int, n_head_kv: int, head_dim: int, type_k: str = "f16",
                       type_v: str | None = None) -> int:
    """Bytes one context cell costs across all layers (K row + V row per layer)."""
    row = n_head_kv * head_dim
    return kv_bytes_for_rows(n_layer, row, row, 1, type_k, type_v) // padded_ctx(1)


def kv_bytes_for_rows(n_layer: int, k_row: int, v_row: int, n_ctx: int, type_k: str = "f16",
                      type_v: str | None = None) -> int:
    """Whole-cache bytes from row lengths (n_head_kv*head_dim for K and V), as llama.cpp allocates it."""
    try:
        per_token = n_layer * (kv_type(type_k).row_bytes(k_row) + kv_type(type_v or type_k).row_bytes(v_row))
    except KVTypeError as exc:
        raise QuantError(str(exc)) from None
    return per_token * padded_ctx(n_ctx)


def kv_bytes(n_layer: int, n_head_kv: int, head_dim: int, n_ctx: int, type_k: str = "f16",
             type_v: str | None = None) -> int:
    return kv_bytes_per_token(n_layer, n_head_kv, head_dim, type_k, type_v) * padded_ctx(n_ctx)
