"""Model families: every fact about one family in its own package; generic code looks them up here.

A new family (as Qwen3-VL MoE was, a future Qwen) is one new package plus one line in
each table below. Importing this module loads no torch or transformers.
"""
from __future__ import annotations

from typing import Any

from .chat_format import ChatFormat
from .errors import ModelConfigError
from .qwen3vl import arch as qwen3vl_arch
from .qwen3vl.chat_format import CHAT_FORMAT as QWEN3VL_CHAT_FORMAT
from .qwen3vlmoe import arch as qwen3vlmoe_arch
from .spec import ArchSpec

ARCHITECTURES: tuple[ArchSpec, ...] = (qwen3vl_arch.SPEC, qwen3vlmoe_arch.SPEC)
# GGUF general.architecture -> chat markup; None: a GGUF that does not say.
CHAT_FORMATS: dict[str | None, ChatFormat] = {"qwen3vl": QWEN3VL_CHAT_FORMAT, "qwen3vlmoe": QWEN3VL_CHAT_FORMAT,
                                              None: QWEN3VL_CHAT_FORMAT}
# The converter's ArchSpec name -> the family's calibration input builder module (MoE: the dense one's).
CALIBRATION = {"qwen3vl": "edge_models.qwen3vl.calibration", "qwen3vlmoe": "edge_models.qwen3vl.calibration"}
# ... and its transformers reference module (tensor_shapes: names and shapes from config.json alone).
REFERENCE = {"qwen3vl": "edge_models.qwen3vl.reference", "qwen3vlmoe": "edge_models.qwen3vlmoe.reference"}


def lookup(config: dict[str, Any], config_path: str = "config.json") -> ArchSpec:
    """The ArchSpec for a Hugging Face config.json; ModelConfigError lists the supported ones."""
    names = config.get("architectures") or []
    for spec in ARCHITECTURES:
        if any(n in spec.hf_architectures for n in names):
            return spec
    supported = ", ".join(a for s in ARCHITECTURES for a in s.hf_architectures)
    for spec in ARCHITECTURES:
        for n in names:
            if n in spec.unsupported_relatives:
                raise ModelConfigError(f"{config_path}: {n}: {spec.unsupported_relatives[n]} Supported: {supported}.")
    found = ", ".join(map(str, names)) or f"none (model_type {config.get('model_type')!r})"
    raise ModelConfigError(f"{config_path}: architecture {found} is not supported. Supported: {supported}.")


def chat_format(gguf_arch: str | None = None) -> ChatFormat:
    """The chat markup of a GGUF text model's architecture (the default family's for unknown ones)."""
    return CHAT_FORMATS.get(gguf_arch, CHAT_FORMATS[None])


def family_module(table: dict[str, str], arch_name: str):
    """The family module a table names for an ArchSpec name (imported on demand: it may need torch)."""
    import importlib

    if arch_name not in table:
        raise ModelConfigError(f"no model package provides this for architecture {arch_name!r}.")
    return importlib.import_module(table[arch_name])
