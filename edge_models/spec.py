"""The shapes of a model family's description, as generic code consumes them.

A model package (edge_models/<family>/) fills these in declaratively: its ArchSpec
(arch.py: which Hugging Face architectures it takes, which GGUF files come out,
how source tensor names map to GGUF names, which metadata goes in), its
VisionFacts (vision.py: processor defaults no GGUF carries) and its FamilySpec
(family.py: all of it, under the architecture names generic code looks it up by).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping, Protocol

import numpy as np
from gguf import GGUFWriter

from .chat_format import ChatFormat
from .errors import ModelConfigError

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
    # (config.json, its path) -> None: every number the family reads, typed and in range, checked once
    # where a config enters (edge_models.lookup), so no later step meets a string where a count belongs
    check_config: Callable[[dict[str, Any], str], None] = lambda config, source: None


@dataclass(frozen=True)
class VisionFacts:
    """A family's image and video processor facts: what the runtime falls back on when a projector
    GGUF lacks a key, and what no GGUF carries (video sampling, the grounding minimum, the encoder's
    stages, the projector's compute buffer)."""

    patch_size: int
    merge_size: int
    min_tokens: int  # the image processor's bounds, in merged tokens
    max_tokens: int
    grounding_min_tokens: int  # detail=high's floor: the family's advice for grounding and OCR
    temporal_patch_size: int  # video frames per temporal group
    video_fps: float  # the video processor's sampling defaults
    video_min_frames: int
    video_max_frames: int
    warmup_patches: int  # the image (in patches) mtmd reserves the projector's compute buffer with
    projector_compute_bytes: Callable[[int, int, int], int]  # (patches, n_embd, n_ff) -> bytes
    encoder_stages: tuple[tuple[str, str], ...] = ()  # (projector weight-name regex, stage name)

    @property
    def factor(self) -> int:
        """Pixels per side of one merged vision token."""
        return self.patch_size * self.merge_size


TOOLS = ("reference", "calibration", "synthetic")


@dataclass(frozen=True)
class FamilySpec:
    """One model family as generic code sees it; edge_models.FAMILIES lists them.

    Looked up by the Hugging Face architecture of a checkpoint (the converter), the
    general.architecture of a text GGUF or the clip.projector_type of a projector GGUF
    (the runtime). A sibling (a MoE variant, a next version) is one more FamilySpec,
    often its parent's with `dataclasses.replace` of what differs, and one entry in
    FAMILIES.
    """

    arch: ArchSpec
    gguf_architectures: tuple[str, ...]  # general.architecture of its text GGUF
    projector_types: tuple[str, ...]  # clip.projector_type of its projector GGUF
    chat_format: ChatFormat
    vision: VisionFacts
    # Modules imported only on demand (they need torch/transformers): the transformers reference
    # (Reference, tensor_shapes), imatrix calibration inputs (model_inputs), random-weight
    # checkpoints (SyntheticSpec, build_checkpoint).
    reference: str = ""
    calibration: str = ""
    synthetic: str = ""

    @property
    def name(self) -> str:
        return self.arch.name

    def module(self, tool: str) -> ModuleType:
        """The family's `tool` module (one of TOOLS), imported now; ModelConfigError if it has none."""
        if tool not in TOOLS:
            # a plain ValueError: tool names come from the project's own code: a programming error
            raise ValueError(f"tool must be one of {', '.join(TOOLS)}, got {tool!r}")
        path = getattr(self, tool)
        if not path:
            raise ModelConfigError(f"the {self.name} model package provides no {tool} module.")
        return importlib.import_module(path)
