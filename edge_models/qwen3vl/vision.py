"""Qwen3-VL's image and video processor facts: the image bounds the runtime falls back on when a
projector GGUF lacks them (projectors converted before `clip.vision.image_min/max_pixels` were
written), and the video processor's sampling defaults (no GGUF carries those)."""
from __future__ import annotations

from ..spec import VisionFacts

# Qwen3-VL's preprocessor_config.json: size.shortest_edge = 65536 pixels and
# size.longest_edge = 16777216 pixels, i.e. 64 .. 16384 merged 32x32 tokens.
PROCESSOR_MIN_TOKENS = 64
PROCESSOR_MAX_TOKENS = 16384
PATCH_SIZE = 16
MERGE_SIZE = 2
# Qwen's advice for grounding and OCR (also llama.cpp's warning, issue 16842).
GROUNDING_MIN_TOKENS = 1024


# The encoder's stages, by the GGUF names of the projector weights a graph node reads (clip's
# layout: models/qwen3vl.cpp in mtmd). A node that reads no weight (attention scores, GELU,
# casts, residual adds) counts toward the next node that does: FLASH_ATTN_EXT toward the
# attention's output projection, GELU toward ffn_down.
ENCODER_STAGES = (
    (r"^v\.(patch_embd|position_embd)\.", "patch embedding"),
    (r"^v\.blk\.\d+\.(ln1|attn_)", "attention"),
    (r"^v\.blk\.\d+\.(ln2|ffn_)", "mlp"),
    (r"^v\.deepstack\.", "deepstack"),
    (r"^(v\.post_ln|mm)\.", "merger"),
)


def projector_compute_bytes(patches: int, n_embd: int, n_ff: int) -> int:
    """The projector's compute buffer for one image of `patches` 16x16 patches: 4 * patches * 2 *
    (n_embd + n_ff) bytes, within 3% of mtmd's reported buffer for the Qwen3-VL-2B projector
    (322.5 MiB at its 92 x 92 patch warm-up image); an estimate for other shapes."""
    return 4 * patches * 2 * (n_embd + n_ff)


# mtmd reserves the projector's compute buffer at warm-up with a 1472x1472 image for
# Qwen-VL-style projectors: 92 x 92 patches of 16.
WARMUP_PATCHES = 92 * 92


# Qwen3VLVideoProcessor's defaults (video_preprocessor_config.json; transformers 4.57 / 5).
VIDEO_FPS = 2.0
VIDEO_MIN_FRAMES = 4
VIDEO_MAX_FRAMES = 768
# Frames per temporal group: the patch embedding's temporal_patch_size.
TEMPORAL_PATCH_SIZE = 2
# One merged vision token per FACTOR x FACTOR pixels (patch 16 x spatial merge 2).
FACTOR = PATCH_SIZE * MERGE_SIZE

FACTS = VisionFacts(
    patch_size=PATCH_SIZE,
    merge_size=MERGE_SIZE,
    min_tokens=PROCESSOR_MIN_TOKENS,
    max_tokens=PROCESSOR_MAX_TOKENS,
    grounding_min_tokens=GROUNDING_MIN_TOKENS,
    temporal_patch_size=TEMPORAL_PATCH_SIZE,
    video_fps=VIDEO_FPS,
    video_min_frames=VIDEO_MIN_FRAMES,
    video_max_frames=VIDEO_MAX_FRAMES,
    warmup_patches=WARMUP_PATCHES,
    projector_compute_bytes=projector_compute_bytes,
    encoder_stages=ENCODER_STAGES,
)
