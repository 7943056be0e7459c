"""Model families: every fact about one family in its own package; generic code looks them up here.

A family is a FamilySpec (edge_models/<family>/family.py) and one entry in
FAMILIES; generic code finds it by the architecture it holds (a Hugging Face
config.json, a text GGUF's general.architecture, a projector's clip.projector_type)
and never imports a family's package itself (tests/test_layers.py checks).
Importing this module loads no torch or transformers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .chat_format import ChatFormat
from .errors import ModelConfigError
from .qwen3vl.family import FAMILY as QWEN3VL
from .qwen3vlmoe.family import FAMILY as QWEN3VLMOE
from .spec import ArchSpec, FamilySpec, VisionFacts

__all__ = ["FAMILIES", "ArchSpec", "ChatFormat", "FamilySpec", "ModelConfigError", "VisionFacts", "chat_format",
           "family_for_checkpoint", "family_for_gguf", "family_for_hf", "family_for_projector", "lookup"]

# One entry per family. The first is the default: what a GGUF naming no family we know gets
# (llama.cpp may still run it; our runtime then uses these processor defaults and markup).
FAMILIES: tuple[FamilySpec, ...] = (
    QWEN3VL,
    QWEN3VLMOE,
)


def family_for_hf(config: dict[str, Any], config_path: str = "config.json") -> FamilySpec:
    """The family of a Hugging Face config.json; ModelConfigError lists the supported architectures."""
    names = config.get("architectures") or []
    for family in FAMILIES:
        if any(n in family.arch.hf_architectures for n in names):
            return family
    supported = ", ".join(a for f in FAMILIES for a in f.arch.hf_architectures)
    for family in FAMILIES:
        for n in names:
            if n in family.arch.unsupported_relatives:
                raise ModelConfigError(f"{config_path}: {n}: {family.arch.unsupported_relatives[n]} "
                                       f"Supported: {supported}.")
    found = ", ".join(map(str, names)) or f"none (model_type {config.get('model_type')!r})"
    raise ModelConfigError(f"{config_path}: architecture {found} is not supported. Supported: {supported}.")


def family_for_checkpoint(model_dir: str | Path) -> FamilySpec:
    """The family of a Hugging Face checkpoint folder, by its config.json."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelConfigError(f"{path}: unreadable ({exc}); give a Hugging Face checkpoint folder") from None
    return family_for_hf(config, str(path))


def lookup(config: dict[str, Any], config_path: str = "config.json") -> ArchSpec:
    """The converter's ArchSpec for a Hugging Face config.json, whose numbers it checks (naming `config_path`)."""
    spec = family_for_hf(config, config_path).arch
    spec.check_config(config, config_path)
    return spec


def family_for_gguf(gguf_arch: str | None = None) -> FamilySpec:
    """The family of a text GGUF's general.architecture (the default family for None or an unknown one)."""
    return next((f for f in FAMILIES if gguf_arch in f.gguf_architectures), FAMILIES[0])


def family_for_projector(projector_type: str | None = None) -> FamilySpec:
    """The family of a projector GGUF's clip.projector_type (the default family for None or an unknown one)."""
    return next((f for f in FAMILIES if projector_type in f.projector_types), FAMILIES[0])


def chat_format(gguf_arch: str | None = None) -> ChatFormat:
    """The chat markup of a GGUF text model's architecture (the default family's for unknown ones)."""
    return family_for_gguf(gguf_arch).chat_format
