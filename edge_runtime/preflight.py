"""Checks on a projector GGUF for flaws that make llama.cpp abort the whole process.

ggml reports some invalid graphs with GGML_ASSERT (an abort, not an error code),
so such files are refused here with an explanation instead.
"""
from __future__ import annotations

from pathlib import Path

from gguf import GGMLQuantizationType, GGUFReader

# Tensors the vision graph adds to or interpolates in f32: ggml asserts on other types.
F32_ONLY = ("v.position_embd.weight",)


def projector_problems(path: str | Path) -> list[str]:
    """Human-readable reasons this projector would crash llama.cpp (empty if none known)."""
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf-py raises plain exceptions on malformed files
        return [f"not a readable GGUF file ({exc})"]
    problems = []
    for tensor in reader.tensors:
        if tensor.name in F32_ONLY and tensor.tensor_type != GGMLQuantizationType.F32:
            problems.append(
                f"{tensor.name} is stored as {tensor.tensor_type.name}, but llama.cpp's vision graph needs F32 "
                "(it would abort the process on the first image); re-convert with a converter that keeps it F32"
            )
    return problems
