"""Qwen3-VL's image processor facts the runtime falls back on when a projector GGUF lacks them
(projectors converted before `clip.vision.image_min/max_pixels` were written)."""
from __future__ import annotations

# Qwen3-VL's preprocessor_config.json: size.shortest_edge = 65536 pixels and
# size.longest_edge = 16777216 pixels, i.e. 64 .. 16384 merged 32x32 tokens.
PROCESSOR_MIN_TOKENS = 64
PROCESSOR_MAX_TOKENS = 16384
PATCH_SIZE = 16
MERGE_SIZE = 2
# Qwen's advice for grounding and OCR (also llama.cpp's warning, issue 16842).
GROUNDING_MIN_TOKENS = 1024
