"""KV-cache types llama.cpp accepts (common/arg.cpp kv_cache_types) and what they cost.

The cache holds, per layer and per context cell, one K row and one V row of
n_head_kv * head_dim values each, stored as ggml rows of the chosen type.
Sizes come from ggml block sizes (gguf-py's table), so a quantized cache's
per-block scales are counted. llama.cpp rounds the context up to 256 cells.
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as G

from .errors import QuantError

CTX_PAD = 256  # llama_context pads n_ctx to a multiple of this


@dataclass(frozen=True)
class KvType:
    name: str
    ggml_type: G
    needs_flash_attn_for_v: bool  # a quantized V cache only works with flash attention

    @property
    def block(self) -> int:
        return GGML_QUANT_SIZES[self.ggml_type][0]

    @property
    def bytes_per_element(self) -> float:
        block, size = GGML_QUANT_SIZES[self.ggml_type]
        return size / block

    def row_bytes(self, n: int) -> int:
        """Bytes of one row of n values (n must be a multiple of the block size)."""
        block, size = GGML_QUANT_SIZES[self.ggml_type]
        if n % block:
            raise QuantError(f"KV type {self.name} needs rows that are multiples of {block} values; "
                             f"this model's rows have {n}. Choose f16 or q8_0 for --kv-type.")
        return n // block * size


KV_TYPES: tuple[KvType, ...] = tuple(
    KvType(n, t, t not in (G.F32, G.F16, G.BF16))
    for n, t in (("f32", G.F32), ("f16", G.F16), ("bf16", G.BF16), ("q8_0", G.Q8_0), ("q4_0", G.Q4_0),
                 ("q4_1", G.Q4_1), ("iq4_nl", G.IQ4_NL), ("q5_0", G.Q5_0), ("q5_1", G.Q5_1))
)
_BY_NAME = {t.name: t for t in KV_TYPES}


def kv_type(name: str) -> KvType:
    t = _BY_NAME.get(str(name).strip().lower())
    if t is None:
        raise QuantError(f"unknown KV cache type {name!r}; choose one of: {', '.join(_BY_NAME)}.")
    return t


def padded_ctx(n_ctx: int) -> int:
    return -(-int(n_ctx) // CTX_PAD) * CTX_PAD


def kv_bytes_per_token(n_layer: int, n_head_kv: int, head_dim: int, type_k: str = "f16",
                       type_v: str | None = None) -> int:
    """Bytes one context cell costs across all layers (K row + V row per layer)."""
    row = n_head_kv * head_dim
    return n_layer * (kv_type(type_k).row_bytes(row) + kv_type(type_v or type_k).row_bytes(row))


def kv_bytes_for_rows(n_layer: int, k_row: int, v_row: int, n_ctx: int, type_k: str = "f16",
                      type_v: str | None = None) -> int:
    """Whole-cache bytes from row lengths (n_head_kv*head_dim for K and V), as llama.cpp allocates it."""
    per_token = n_layer * (kv_type(type_k).row_bytes(k_row) + kv_type(type_v or type_k).row_bytes(v_row))
    return per_token * padded_ctx(n_ctx)


def kv_bytes(n_layer: int, n_head_kv: int, head_dim: int, n_ctx: int, type_k: str = "f16",
             type_v: str | None = None) -> int:
    return kv_bytes_per_token(n_layer, n_head_kv, head_dim, type_k, type_v) * padded_ctx(n_ctx)
