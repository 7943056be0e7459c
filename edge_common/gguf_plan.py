"""What a GGUF file will hold, as names, shapes and types: the converter plans it, the quantizer sizes it.

One type for both sides: shapes here are in ggml order (ne0, the row length,
first), as llama.cpp and GGUF's tensor table list them. (The converter's
streamed FloatTensor uses numpy order, outermost first.)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


@dataclass(frozen=True)
class TensorSize:
    name: str
    shape: tuple[int, ...]  # ggml order: ne0 (row length) first
    ggml_type: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.ggml_type]
        return int(np.prod(self.shape, dtype=np.int64)) // block * size


@dataclass(frozen=True)
class ModelShapes:
    """The converter's tensors per role ("text", "mmproj") and their metadata sizes."""

    tensors: Mapping[str, tuple[TensorSize, ...]]  # as in an f16 file
    metadata_bytes: Mapping[str, int]  # GGUF key/value section of each file (measured or estimated)
    source: str
    float_tensors: Mapping[str, Mapping[str, tuple[TensorSize, ...]]] = field(default_factory=dict)
    architecture: str | None = None  # the text file's general.architecture: its family's facts size the rest
    experts_used: int = 0  # experts each token runs through (MoE); 0 for a dense model

    def as_float(self, role: str, float_name: str) -> tuple[TensorSize, ...]:
        """The role's tensors as the converter writes them for --quant f32/f16/bf16."""
        return self.float_tensors[role][float_name]


def natural_key(name: str) -> list[Any]:
    """blk.2 before blk.10: the order the converter writes tensors in."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
