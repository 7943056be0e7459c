"""Find the GGUF pair of a converter output directory (its manifest.json) or a lone file.

The runtime does not import `convert` (which needs torch); it only reads the
manifest's documented shape: {"text": {"path": ...}, "mmproj": {"path": ...}}.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelFileError

MANIFEST = "manifest.json"


def resolve_model_paths(target: str | Path, mmproj: str | Path | None = None) -> tuple[Path, Path | None]:
    """(text model, projector or None) for an output directory or a text GGUF path."""
    path = Path(target)
    if path.is_dir():
        manifest = path / MANIFEST
        if not manifest.is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            raise ModelFileError(
                f"{manifest} not found; pass a converter output directory"
                + (f" or one of its GGUF files ({', '.join(ggufs)}) with --mmproj" if ggufs else "")
            )
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            text = path / data["text"]["path"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelFileError(f"{manifest} is not a converter manifest ({exc!r})") from None
        if mmproj is None and isinstance(data.get("mmproj"), dict) and data["mmproj"].get("path"):
            mmproj = path / data["mmproj"]["path"]
        for role, p in (("text model", text), ("projector", mmproj)):
            if p is not None and not Path(p).is_file():
                raise ModelFileError(f"{manifest} lists the {role} {p}, which does not exist")
        return text, Path(mmproj) if mmproj else None
    if not path.is_file():
        raise ModelFileError(f"{path} not found: pass a converter output directory or a text-model GGUF")
    if mmproj is not None and not Path(mmproj).is_file():
        raise ModelFileError(f"projector {mmproj} not found")
    return path, Path(mmproj) if mmproj else None
