"""OUT_DIR/manifest.json: what a conversion wrote, so runtimes find the pair by role."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .atomic import atomic_output

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


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    manifest = {"format": FORMAT_VERSION, **manifest}
    write_json_atomic(Path(out_dir) / MANIFEST, manifest)
    return manifest


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / MANIFEST
    with open(path, encoding="utf-8") as f:
        return json.load(f)
