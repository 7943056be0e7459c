"""The `system_fingerprint` of every response: which weights and which build answered.

OpenAI documents it as the backend configuration a seed's determinism depends on;
llama-server sends its build ("b<number>-<commit>"). Here it is the sha256 of the
text model and the projector (the same digests saved conversations check), this
package's version and llama-cpp-python's (which pins the llama.cpp it vendors):
one of them changing may change the answer to the same seed. The files are read
once, in a worker thread while the model loads.
"""
from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

from edge_common.manifest import file_sha256

PACKAGES = ("qwen3-vl-edge", "llama_cpp_python")


def build_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def system_fingerprint(model: Path, mmproj: Path | None) -> str:
    """'b<llama-cpp-python version>-<12 hex digits>' (starts with "b" as llama-server's does)."""
    versions = build_versions()
    parts = [file_sha256(model), file_sha256(mmproj) if mmproj is not None else "-",
             *(f"{k}={v}" for k, v in sorted(versions.items()))]
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
    return f"b{versions['llama_cpp_python']}-{digest}"
