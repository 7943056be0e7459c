"""Qwen3-VL MoE (30B-A3B, 235B-A22B): what differs from the dense family in edge_models.qwen3vl.

The vision tower, projector, chat format, processors and calibration are the dense
family's; this package overrides only the language model's FFN (routed experts, a
router per layer) and the transformers classes:

- `arch`: the converter's ArchSpec (`qwen3vlmoe` text file, the dense `qwen3vl_merger` projector);
- `reference`: transformers' Qwen3VLMoeForConditionalGeneration; `synthetic`: random-weight
  MoE checkpoints in either expert layout. Both need torch/transformers.
"""
