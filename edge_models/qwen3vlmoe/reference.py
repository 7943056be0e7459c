"""The transformers reference for Qwen3-VL MoE: the dense Reference with the MoE classes.

Needs the `convert` extra (torch, transformers >= 4.57).
"""
from __future__ import annotations

import functools

from ..qwen3vl import reference as dense

MODEL_CLASS = "Qwen3VLMoeForConditionalGeneration"
CONFIG_CLASS = "Qwen3VLMoeConfig"

tensor_shapes = functools.partial(dense.tensor_shapes, model_class=MODEL_CLASS, config_class=CONFIG_CLASS)
image_processor = dense.image_processor


class Reference(dense.Reference):
    model_class = MODEL_CLASS
