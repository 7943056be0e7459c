"""Quantize a text-model GGUF with llama.cpp's own quantizer (llama_model_quantize).

This is the code path of the llama-quantize tool: the same default params,
the same per-tensor mix rules (llama_tensor_get_type), and the importance
matrix handed over the way tools/quantize/quantize.cpp does it: a
NULL-terminated array of {name, float*, size} holding sum/count per column,
plus the quantize.imatrix.* metadata keys. So the output is byte-identical to
`llama-quantize [--imatrix F] IN OUT TYPE`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from edge_common.atomic import atomic_output
from edge_common.disk import check_rewrite

from . import catalog
from .errors import QuantError
from .imatrix import Imatrix, resolve
from .imatrix_check import matrix_columns
from .report import Fallback, QuantReport, build_report

# Metadata keys llama-quantize adds when given an imatrix (tools/quantize/quantize.cpp).
KV_IMATRIX_FILE = "quantize.imatrix.file"
KV_IMATRIX_DATASET = "quantize.imatrix.dataset"
KV_IMATRIX_N_ENTRIES = "quantize.imatrix.entries_count"
KV_IMATRIX_N_CHUNKS = "quantize.imatrix.chunks_count"
_FALLBACK = re.compile(
    r"warning: (\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\)\s*"
    r"(?:\(WARNING: must use F16 due to unusual shape\)\s*)?-> falling back to\s+(\S+)"
)
_PROGRESS = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")

IMATRIX_HELP = (
    "pass --imatrix auto (computes one from the Hugging Face checkpoint over built-in images and prompts, "
    "or your own with --calibration DIR) or --imatrix FILE (an imatrix.gguf written by llama.cpp's llama-imatrix)"
)


@dataclass(frozen=True)
class TextQuantOptions:
    quant: str  # catalog name, e.g. "q4_k_m"
    imatrix: Imatrix | str | Path | None = None
    nthread: int = 0  # 0: every core (llama.cpp's default)
    pure: bool = False  # llama-quantize --pure: no k-quant mix
    progress: bool = True
    overwrite: bool = False


def require_imatrix(quant: str, imatrix: object) -> None:
    """Refuse a type that needs an importance matrix when there is none, saying how to get one."""
    t = catalog.lookup(quant)
    if t.needs_imatrix and imatrix is None:
        raise QuantError(f"{t.name} needs an importance matrix (low-bit types are garbage without one): {IMATRIX_HELP}.")


def imatrix_metadata(im: Imatrix, n_entries: int) -> dict[str, str | int]:
    """quantize.imatrix.* keys, as llama-quantize writes them (so files match byte for byte)."""
    meta: dict[str, str | int] = {KV_IMATRIX_FILE: im.label}
    if im.datasets:
        meta[KV_IMATRIX_DATASET] = im.datasets[0]
    meta[KV_IMATRIX_N_ENTRIES] = n_entries
    if im.chunk_count > 0:
        meta[KV_IMATRIX_N_CHUNKS] = im.chunk_count
    return meta


def parse_fallbacks(log: str) -> tuple[Fallback, ...]:
    return tuple(Fallback(m[1], m[4].upper(), m[5].upper(), f"row length {m[2]} is not a multiple of {m[3]}")
                 for m in _FALLBACK.finditer(log))


def quantize_text(src: str | Path, dst: str | Path, options: TextQuantOptions) -> QuantReport:
    """Quantize the text GGUF `src` to `dst` (written under a temp name, then renamed)."""
    from tqdm import tqdm

    from edge_llama import LlamaError, capture
    from edge_llama.quantize import quantize_file

    t = catalog.lookup(options.quant)
    src, dst = Path(src), Path(dst)
    check_rewrite(src, dst, options.overwrite, "text", QuantError)
    im = resolve(options.imatrix)
    require_imatrix(t.name, im)
    values = metadata = None
    if im is not None:
        names = set(matrix_columns(src)) & set(im.entries)
        values = {n: im.values(n) for n in sorted(names)}
        if t.needs_imatrix and not values:
            raise QuantError(f"{im.label}: has no data for any tensor of {src.name}; {IMATRIX_HELP}.")
        metadata = imatrix_metadata(im, len(values))
    bar = tqdm(total=None, desc=f"{dst.name}", unit="tensor", disable=not options.progress, leave=False)

    def on_line(level: int, line: str) -> None:
        m = _PROGRESS.search(line)
        if m:
            bar.total = int(m[2])
            bar.n = int(m[1])
            bar.refresh()

    try:
        with atomic_output(dst) as tmp, capture(on_line) as log:
            try:
                quantize_file(src, tmp, t.ftype, nthread=options.nthread, pure=options.pure, imatrix=values,
                              metadata=metadata)
            except LlamaError:
                raise QuantError(f"llama.cpp could not quantize {src.name} to {t.name}: "
                                 f"{log.errors() or 'see its log'}") from None
    finally:
        bar.close()
    return build_report(dst, t.name, fallbacks=parse_fallbacks(log.text),
                        imatrix=im.label if im is not None else None, imatrix_entries=len(values or ()))
