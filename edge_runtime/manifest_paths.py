"""Find the GGUF pair of a converter output directory (its manifest.json) or a lone file.

The runtime does not import `convert` (which needs torch); the manifest's one
reader is edge_common.manifest. Its refusals surface as the runtime's ModelFileError.
"""
from __future__ import annotations

from pathlib import Path

from edge_common import manifest
from edge_common.errors import ModelFileError as MissingFile

from .errors import ModelFileError


def resolve_model_paths(target: str | Path, mmproj: str | Path | None = None) -> tuple[Path, Path | None]:
    """(text model, projector or None) for an output directory or a text GGUF path."""
    try:
        return manifest.resolve_model_paths(target, mmproj)
    except MissingFile as e:
        if isinstance(e, ModelFileError):
            raise
        raise ModelFileError(str(e)) from None
