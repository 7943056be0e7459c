"""Qwen3-VL MoE as one entry of edge_models.FAMILIES: the dense family's facts, its own text file.

The projector, chat markup, processors and calibration inputs are the dense family's (same
vision tower, same `qwen3vl_merger` projector), so only the ArchSpec, the `qwen3vlmoe` text
architecture and the transformers-backed modules differ.
"""
from __future__ import annotations

from dataclasses import replace

from ..qwen3vl.family import FAMILY as DENSE
from .arch import SPEC

FAMILY = replace(
    DENSE,
    arch=SPEC,
    gguf_architectures=tuple(o.gguf_arch for o in SPEC.outputs if o.role == "text"),  # "qwen3vlmoe"
    reference="edge_models.qwen3vlmoe.reference",
    synthetic="edge_models.qwen3vlmoe.synthetic",
)
