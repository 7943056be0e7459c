"""What a quantization wrote: per-tensor types and sizes, read back from the GGUF file.

Both quantizers return a QuantReport, built from the output file itself (not
from what we meant to write), so manifests and tests see the truth.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: str  # gguf-py's name, e.g. "Q4_K"
    shape: tuple[int, ...]  # ggml order: ne0 (row length) first
    n_bytes: int


@dataclass(frozen=True)
class Fallback:
    """A tensor whose row length does not fit the wanted type's block, and what it got instead."""

    tensor: str
    wanted: str
    used: str
    reason: str


@dataclass(frozen=True)
class QuantReport:
    path: Path
    quant: str  # catalog name
    file_bytes: int
    tensors: tuple[TensorInfo, ...]
    fallbacks: tuple[Fallback, ...] = ()
    imatrix: str | None = None  # the imatrix used (path or dataset), if any
    imatrix_entries: int = 0  # how many of this file's tensors had imatrix data
    extra: dict[str, Any] = field(default_factory=dict)

    def types(self) -> dict[str, str]:
        return {t.name: t.ggml_type for t in self.tensors}

    def type_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(t.ggml_type for t in self.tensors).items()))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary for manifest.json (per-type counts, not every tensor)."""
        return {
            "type": self.quant,
            "bytes": self.file_bytes,
            "tensor_types": self.type_counts(),
            "fallbacks": {f.tensor: f"{f.wanted}->{f.used}" for f in self.fallbacks},
            "imatrix": self.imatrix,
            "imatrix_entries": self.imatrix_entries,
            **self.extra,
        }


def read_tensors(path: str | Path) -> tuple[TensorInfo, ...]:
    """Every tensor's name, type, shape and byte size, as stored in the GGUF file."""
    import gguf

    r = gguf.GGUFReader(path)
    return tuple(TensorInfo(t.name, t.tensor_type.name, tuple(int(x) for x in t.shape), int(t.n_bytes))
                 for t in r.tensors)


def build_report(path: str | Path, quant: str, **kw: Any) -> QuantReport:
    path = Path(path)
    return QuantReport(path, quant, path.stat().st_size, read_tensors(path), **kw)
