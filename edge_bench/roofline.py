"""How close decode is to the memory-bandwidth limit.

Generating one token reads every weight of the text model once (the token
embedding table only for its one row, unless it doubles as the output
matrix) plus the K and V of every position so far. So
tok/s x bytes per token / read bandwidth is the fraction of the hardware
limit a runtime reaches; 1.0 is the roofline.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

TOKEN_EMBD = "token_embd.weight"
OUTPUT = "output.weight"


@dataclass(frozen=True)
class Roofline:
    weight_bytes: int  # text-model bytes read per token
    kv_bytes: float  # K+V bytes read per token at the mean decode context
    bandwidth_bytes_s: float
    decode_tok_s: float

    @property
    def bytes_per_token(self) -> float:
        return self.weight_bytes + self.kv_bytes

    @property
    def bound_tok_s(self) -> float:
        """The decode rate the memory could sustain if nothing else cost time."""
        return self.bandwidth_bytes_s / self.bytes_per_token

    @property
    def fraction(self) -> float:
        return self.decode_tok_s * self.bytes_per_token / self.bandwidth_bytes_s

    def to_dict(self) -> dict:
        return {**asdict(self), "bytes_per_token": self.bytes_per_token, "bound_tok_s": self.bound_tok_s,
                "fraction": self.fraction}


def weight_bytes_read(tensor_bytes: dict[str, int]) -> int:
    """Bytes of weights one decode step reads, from {tensor name: stored bytes}."""
    total = sum(tensor_bytes.values())
    if OUTPUT in tensor_bytes and TOKEN_EMBD in tensor_bytes:
        total -= tensor_bytes[TOKEN_EMBD]  # untied: the embedding is a row lookup
    return total


def gguf_tensor_bytes(path: str | Path) -> dict[str, int]:
    import gguf

    return {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}


def kv_bytes_read(kv_cache_bytes: int, n_ctx: int, prompt_tokens: int, decode_tokens: int) -> float:
    """K+V bytes per decoded token: every cached position is read, on average prompt + half the answer."""
    per_position = kv_cache_bytes / n_ctx
    return per_position * (prompt_tokens + decode_tokens / 2)


def roofline(weight_bytes: int, kv_bytes: float, bandwidth_bytes_s: float, decode_tok_s: float) -> Roofline:
    if bandwidth_bytes_s <= 0:
        # a plain ValueError: a measured bandwidth is positive: a programming error
        raise ValueError("bandwidth must be positive")
    return Roofline(weight_bytes, kv_bytes, bandwidth_bytes_s, decode_tok_s)
