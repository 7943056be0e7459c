"""Registry of supported architectures: one declarative module each."""
from __future__ import annotations

from typing import Any

from ..errors import ConvertError
from ..spec import ArchSpec
from . import qwen3vl

ARCHITECTURES: tuple[ArchSpec, ...] = (qwen3vl.SPEC,)


def lookup(config: dict[str, Any], config_path: str = "config.json") -> ArchSpec:
    names = config.get("architectures") or []
    for spec in ARCHITECTURES:
        if any(n in spec.hf_architectures for n in names):
            return spec
    supported = ", ".join(a for s in ARCHITECTURES for a in s.hf_architectures)
    for spec in ARCHITECTURES:
        for n in names:
            if n in spec.unsupported_relatives:
                raise ConvertError(f"{config_path}: {n}: {spec.unsupported_relatives[n]} Supported: {supported}.")
    found = ", ".join(map(str, names)) or f"none (model_type {config.get('model_type')!r})"
    raise ConvertError(f"{config_path}: architecture {found} is not supported. Supported: {supported}.")
