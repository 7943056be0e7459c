"""KV-cache types llama.cpp accepts (common/arg.cpp kv_cache_types) and what one row costs.

The one table for the runtime and for quant's estimates. Sizes come from ggml's
block sizes (gguf-py's GGML_QUANT_SIZES), so a quantized cache's per-block
scales are counted.
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as G

from .errors import KVTypeError


@dataclass(frozen=True)
class KVType:
    name: str
    ggml_type: G

    @property
    def block_elems(self) -> int:
        return GGML_QUANT_SIZES[self.ggml_type][0]

    @property
    def block_bytes(self) -> int:
        return GGML_QUANT_SIZES[self.ggml_type][1]

    @property
    def quantized(self) -> bool:
        """llama.cpp stores a quantized V cache only with flash attention."""
        return self.ggml_type not in (G.F32, G.F16, G.BF16)

    needs_flash_attn_for_v = quantized

    @property
    def bytes_per_element(self) -> float:
        return self.block_bytes / self.block_elems

    def row_bytes(self, n: int) -> int:
        """Bytes of one row of n values (n must be a multiple of the block size)."""
        if n % self.block_elems:
            raise KVTypeError(f"KV type {self.name} needs rows that are multiples of {self.block_elems} values; "
                              f"this model's rows have {n}. Choose f16 or q8_0 for the KV cache type.")
        return n // self.block_elems * self.block_bytes


# Order as llama.cpp's kv_cache_types list.
KV_TYPES: tuple[KVType, ...] = tuple(
    KVType(n, t) for n, t in (("f32", G.F32), ("f16", G.F16), ("bf16", G.BF16), ("q8_0", G.Q8_0), ("q4_0", G.Q4_0),
                              ("q4_1", G.Q4_1), ("iq4_nl", G.IQ4_NL), ("q5_0", G.Q5_0), ("q5_1", G.Q5_1))
)
_BY_NAME = {t.name: t for t in KV_TYPES}


def kv_type(name: str) -> KVType:
    t = _BY_NAME.get(str(name).strip().lower())
    if t is None:
        raise KVTypeError(f"unknown KV cache type {name!r}; choose one of: {', '.join(_BY_NAME)}.")
    return t
