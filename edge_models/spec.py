"""The shape of an architecture description, as the generic converter and estimator consume it.

A model package (edge_models/<family>/arch.py) fills these in declaratively:
which Hugging Face architectures it takes, which GGUF files come out, how source
tensor names map to GGUF names (with any reshaping), and which metadata goes in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np
from gguf import GGUFWriter

Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class TensorMapping:
    """A source tensor becomes `name`, after `transform` (a view-like reshaping) if any.

    `by_rows`: the transform maps each block of rows along axis 0 on its own (a per-expert
    slice or transpose), so the converter streams the tensor in row blocks instead of loading
    it whole: one expert at a time for a [experts, ...] tensor.
    """

    name: str
    transform: Transform | None = None
    by_rows: bool = False


class Checkpoint(Protocol):
    """What a metadata writer reads of a checkpoint (convert.checkpoint.Checkpoint is one)."""

    model_dir: Path
    config: dict[str, Any]
    tensors: Mapping[str, Any]

    def json(self, name: str, what: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class BpeTokenizer:
    """The file's vocabulary comes from the checkpoint's tokenizer.json as a BPE vocab (written by the converter)."""

    pre: str  # llama.cpp pre-tokenizer name
    vocab_size: Callable[[dict[str, Any]], int]  # the model's vocabulary size from config.json
    add_bos: bool = False


@dataclass(frozen=True)
class OutputFile:
    """One GGUF file the architecture produces."""

    role: str  # key in manifest.json: "text" or "mmproj"
    gguf_arch: str
    file_name: Callable[[str, str], str]  # (model name, type name) -> file name
    claims: Callable[[str], bool]  # does this source tensor belong to this file?
    # (source name, config.json, source shape or None when unknown) -> what it becomes
    map_tensor: Callable[..., list[TensorMapping]]
    write_metadata: Callable[[GGUFWriter, Checkpoint], None]
    skip: Callable[[str, dict[str, Any]], bool] = lambda name, config: False
    tokenizer: BpeTokenizer | None = None  # written after write_metadata's keys
    # GGUF tensors kept at f16 in an f16 file and f32 otherwise (loaders need it).
    keep_f16_or_f32: tuple[str, ...] = ()
    # GGUF tensors always f32, by name ending (ops that assert f32 inputs, e.g. ggml_interpolate; MoE routers).
    keep_f32: tuple[str, ...] = ()


@dataclass(frozen=True)
class ArchSpec:
    name: str
    hf_architectures: tuple[str, ...]
    outputs: tuple[OutputFile, ...]
    validate: Callable[[Checkpoint], None] = lambda ckpt: None
    unsupported_relatives: dict[str, str] = field(default_factory=dict)
