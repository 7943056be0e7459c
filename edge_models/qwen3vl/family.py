"""Qwen3-VL (dense) as one entry of edge_models.FAMILIES: every fact generic code may ask, by architecture."""
from __future__ import annotations

import gguf

from ..spec import FamilySpec
from .arch import SPEC
from .chat_format import CHAT_FORMAT
from .vision import FACTS

FAMILY = FamilySpec(
    arch=SPEC,
    gguf_architectures=tuple(o.gguf_arch for o in SPEC.outputs if o.role == "text"),  # "qwen3vl"
    projector_types=(gguf.VisionProjectorType.QWEN3VL,),  # "qwen3vl_merger"
    chat_format=CHAT_FORMAT,
    vision=FACTS,
    reference="edge_models.qwen3vl.reference",
    calibration="edge_models.qwen3vl.calibration",
    synthetic="edge_models.qwen3vl.synthetic",
)
