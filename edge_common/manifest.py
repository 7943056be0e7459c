"""OUT_DIR/manifest.json: what a conversion wrote, so every side finds the pair by role.

The one reader and writer of the file: the converter and quantizer write it, the
runtime, the benchmark and the quality check read it. Its documented shape:
{"text": {"path", "type", "bytes", "sha256"}, "mmproj": {...}, "source": {...}, ...}.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .atomic import write_json_atomic
from .errors import ModelFileError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(out_dir: Path, path: Path, type_name: str, **extra: Any) -> dict[str, Any]:
    return {
        "path": os.path.relpath(path, out_dir),
        "type": type_name,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        **extra,
    }


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    manifest = {"format": FORMAT_VERSION, **manifest}
    write_json_atomic(Path(out_dir) / MANIFEST, manifest)
    return manifest


def read_manifest(out_dir: str | Path, *, need_mmproj: bool = False) -> dict[str, Any]:
    """The manifest of a converter output directory; ModelFileError names what is missing or malformed."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        ggufs = sorted(p.name for p in Path(out_dir).glob("*.gguf")) if Path(out_dir).is_dir() else []
        raise ModelFileError(
            f"{path} not found; pass a converter output directory"
            + (f" or one of its GGUF files ({', '.join(ggufs)}) with --mmproj" if ggufs else "")
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data["text"]["path"]
        if need_mmproj:
            data["mmproj"]["path"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{path} is not a converter manifest ({exc!r})") from None
    return data


def manifest_paths(out_dir: str | Path) -> tuple[Path, Path | None]:
    """(text model, projector or None) as the manifest in `out_dir` names them."""
    d = Path(out_dir)
    data = read_manifest(d)
    mm = data.get("mmproj")
    return d / data["text"]["path"], d / mm["path"] if isinstance(mm, dict) and mm.get("path") else None


def resolve_model_paths(target: str | Path, mmproj: str | Path | None = None) -> tuple[Path, Path | None]:
    """(text model, projector or None) for an output directory or a text GGUF path; checks both exist."""
    path = Path(target)
    if path.is_dir():
        text, listed = manifest_paths(path)
        mmproj = mmproj if mmproj is not None else listed
        for role, p in (("text model", text), ("projector", mmproj)):
            if p is not None and not Path(p).is_file():
                raise ModelFileError(f"{path / MANIFEST} lists the {role} {p}, which does not exist")
        return text, Path(mmproj) if mmproj else None
    if not path.is_file():
        raise ModelFileError(f"{path} not found: pass a converter output directory or a text-model GGUF")
    if mmproj is not None and not Path(mmproj).is_file():
        raise ModelFileError(f"projector {mmproj} not found")
    return path, Path(mmproj) if mmproj else None


_sha_cache: dict[tuple[str, int, int], str] = {}
def file_sha256(path: str | Path) -> str:
    """sha256 of a model file, computed once per (path, size, mtime) in this process."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        _sha_cache[key] = sha256_file(path)
    return _sha_cache[key]
