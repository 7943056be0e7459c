"""Refuse an importance matrix made for another model; report how much of each file it covers."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .errors import QuantError
from .imatrix import Imatrix

MIN_TEXT_COVERAGE = 0.5  # an imatrix covering less than this of the text weights is for another model


@dataclass(frozen=True)
class Coverage:
    """How much of one GGUF file's quantizable weights an imatrix covers."""

    role: str
    covered: tuple[str, ...]
    missing: tuple[str, ...]

    @property
    def fraction(self) -> float:
        total = len(self.covered) + len(self.missing)
        return len(self.covered) / total if total else 1.0


def matrix_shapes(gguf_path: str | Path) -> dict[str, tuple[int, int]]:
    """name -> (row length ne0, matrices: ne2, the experts of a merged MoE tensor, else 1) of each weight a
    quantizer may touch (2-D+, '*.weight', not a norm)."""
    import gguf

    r = gguf.GGUFReader(gguf_path)
    return {t.name: (int(t.shape[0]), int(t.shape[2]) if len(t.shape) > 2 else 1) for t in r.tensors
            if len(t.shape) >= 2 and t.name.endswith("weight") and "_norm." not in t.name}


def matrix_columns(gguf_path: str | Path) -> dict[str, int]:
    """name -> row length (ne0) of each weight a quantizer may touch."""
    return {n: cols for n, (cols, _) in matrix_shapes(gguf_path).items()}


def check(im: Imatrix, models: Mapping[str, str | Path], *, min_text_coverage: float = MIN_TEXT_COVERAGE,
          text_role: str = "text") -> dict[str, Coverage]:
    """Refuse an imatrix made for another model; return its coverage of each file.

    Errors: it names tensors that no file has, its row lengths differ from the
    model's, or it covers less than `min_text_coverage` of the text weights.
    """
    cols = {role: matrix_shapes(p) for role, p in models.items()}
    every: dict[str, tuple[int, int]] = {}
    for c in cols.values():
        every.update(c)
    label = im.label
    unknown = sorted(n for n in im.entries if n not in every)
    if unknown:
        raise QuantError(
            f"{label}: the importance matrix names {len(unknown)} tensor(s) this model does not have "
            f"(first: {unknown[0]!r}); it was computed for another model. Use --imatrix auto to compute one for it."
        )
    for n, e in im.entries.items():
        n_cols, n_mat = every[n]
        if e.n_cols != n_cols:
            raise QuantError(f"{label}: {n} has {e.n_cols} columns in the importance matrix but {n_cols} in the model; "
                             "it was computed for another model. Use --imatrix auto.")
        if len(e.counts) != n_mat:  # llama_model_quantize takes ne0 * experts values, nothing else
            raise QuantError(f"{label}: {n} has {len(e.counts)} expert matrices in the importance matrix but the model "
                             f"has {n_mat} experts; it was computed for another model. Use --imatrix auto.")
    result = {role: Coverage(role, tuple(sorted(n for n in c if n in im.entries)),
                             tuple(sorted(n for n in c if n not in im.entries))) for role, c in cols.items()}
    text = result.get(text_role)
    if text is not None and text.fraction < min_text_coverage:
        raise QuantError(
            f"{label}: the importance matrix covers only {len(text.covered)} of {len(text.covered) + len(text.missing)} "
            f"text-model weights (first missing: {text.missing[0]!r}); it was computed for another model. "
            "Use --imatrix auto."
        )
    return result
