"""Float formats that safetensors and GGUF share: their names, and conversions as plain numpy.

bfloat16 has no numpy dtype: it is carried as uint16 bit patterns.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

# The float file types (the converter writes them; the quantizer keeps them), by their CLI name.
FLOAT_TYPES = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
}
FLOAT_GGML_TYPES = tuple(FLOAT_TYPES.values())


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, as ggml and torch do; NaNs stay NaN."""
    n = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((n + (0x7FFF + ((n >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((n[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Decode a safetensors payload (`dtype` as the safetensors header names it)."""
    if dtype == "F32":
        return raw.view("<f4")
    if dtype == "F16":
        return raw.view("<f2").astype(np.float32)
    if dtype == "BF16":
        return bf16_bits_to_f32(raw.view("<u2"))
    if dtype == "F64":
        return raw.view("<f8").astype(np.float32)
    # a plain ValueError: callers pass only FLOAT_GGML_TYPES: a programming error
    raise ValueError(f"unsupported tensor dtype {dtype}")
