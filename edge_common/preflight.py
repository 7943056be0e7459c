"""Checks on a projector GGUF for flaws that make llama.cpp abort the whole process.

ggml reports some invalid graphs with GGML_ASSERT (an abort, not an error code),
so such files are refused before loading, with an explanation instead. The
runtime and the quality measurement both ask here.
"""
from __future__ import annotations

from pathlib import Path

from gguf import GGMLQuantizationType, GGUFReader

# Name fragments of tensors clip interpolates with ggml_interpolate, which takes F32 only
# (tools/mtmd/clip.cpp; llama.cpp's convert_hf_to_gguf keeps them F32 for that reason).
CLIP_F32_ONLY = (".position_embd",)


def projector_problems(path: str | Path) -> list[str]:
    """Human-readable reasons this projector would crash llama.cpp (empty if none known)."""
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf-py raises plain exceptions on malformed files
        return [f"not a readable GGUF file ({exc})"]
    problems = []
    for tensor in reader.tensors:
        if any(k in tensor.name for k in CLIP_F32_ONLY) and tensor.tensor_type != GGMLQuantizationType.F32:
            problems.append(
                f"{tensor.name} is stored as {tensor.tensor_type.name}, but llama.cpp's vision graph needs F32 "
                "(it would abort the process on the first image); re-convert with a converter that keeps it F32"
            )
    return problems
