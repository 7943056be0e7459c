"""Quantize a text-model GGUF with llama.cpp's own quantizer (llama_model_quantize).

This is the code path of the llama-quantize tool: the same default params,
the same per-tensor mix rules (llama_tensor_get_type), and the importance
matrix handed over the way tools/quantize/quantize.cpp does it: a
NULL-terminated array of {name, float*, size} holding sum/count per column,
plus the quantize.imatrix.* metadata keys. So the output is byte-identical to
`llama-quantize [--imatrix F] IN OUT TYPE`.
"""
from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


class _ImatrixArray:
    """The C array llama_model_quantize reads; keeps every buffer alive while it is used."""

    def __init__(self, im: Imatrix, names: set[str]):
        import llama_cpp

        self.values = {n: np.ascontiguousarray(im.values(n), dtype=np.float32) for n in sorted(names & set(im.entries))}
        self._names = {n: n.encode() for n in self.values}
        arr = (llama_cpp.llama_model_imatrix_data * (len(self.values) + 1))()
        for i, (n, v) in enumerate(self.values.items()):
            arr[i].name = self._names[n]
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.size
        arr[len(self.values)].name = None  # terminator
        self.array = arr


def _kv_overrides(im: Imatrix, n_entries: int):
    """quantize.imatrix.* keys, as llama-quantize writes them (so files match byte for byte)."""
    import llama_cpp

    items: list[tuple[str, int, object]] = [(KV_IMATRIX_FILE, llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, im.label)]
    if im.datasets:
        items.append((KV_IMATRIX_DATASET, llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, im.datasets[0]))
    items.append((KV_IMATRIX_N_ENTRIES, llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, n_entries))
    if im.chunk_count > 0:
        items.append((KV_IMATRIX_N_CHUNKS, llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, im.chunk_count))
    arr = (llama_cpp.llama_model_kv_override * (len(items) + 1))()
    for i, (key, tag, val) in enumerate(items):
        arr[i].key = key.encode()
        arr[i].tag = tag
        if tag == llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR:
            arr[i].value.val_str = str(val).encode()[:127]
        else:
            arr[i].value.val_i64 = int(val)
    arr[len(items)].key = b""  # terminator: empty key
    return arr


def build_params(t: catalog.QuantType, opts: TextQuantOptions):
    """llama_model_quantize_default_params() with the ftype, threads and --pure set (as llama-quantize does)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = t.ftype
    params.nthread = int(opts.nthread)
    params.pure = bool(opts.pure)
    return params


def parse_fallbacks(log: str) -> tuple[Fallback, ...]:
    return tuple(Fallback(m[1], m[4].upper(), m[5].upper(), f"row length {m[2]} is not a multiple of {m[3]}")
                 for m in _FALLBACK.finditer(log))


def quantize_text(src: str | Path, dst: str | Path, options: TextQuantOptions) -> QuantReport:
    """Quantize the text GGUF `src` to `dst` (written under a temp name, then renamed)."""
    import llama_cpp
    from tqdm import tqdm

    from edge_llama import capture

    t = catalog.lookup(options.quant)
    src, dst = Path(src), Path(dst)
    check_rewrite(src, dst, options.overwrite, "text", QuantError)
    im = resolve(options.imatrix)
    require_imatrix(t.name, im)
    params = build_params(t, options)
    keep: list[object] = []
    n_used = 0
    if im is not None:
        cols = matrix_columns(src)
        arr = _ImatrixArray(im, set(cols))
        n_used = len(arr.values)
        if t.needs_imatrix and n_used == 0:
            raise QuantError(f"{im.label}: has no data for any tensor of {src.name}; {IMATRIX_HELP}.")
        overrides = _kv_overrides(im, n_used)
        params.imatrix = ctypes.cast(arr.array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
        keep += [arr, overrides]
    bar = tqdm(total=None, desc=f"{dst.name}", unit="tensor", disable=not options.progress, leave=False)

    def on_line(level: int, line: str) -> None:
        m = _PROGRESS.search(line)
        if m:
            bar.total = int(m[2])
            bar.n = int(m[1])
            bar.refresh()

    try:
        with atomic_output(dst) as tmp, capture(on_line) as log:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
            if rc != 0:
                raise QuantError(f"llama.cpp could not quantize {src.name} to {t.name}: {log.errors() or 'see its log'}")
    finally:
        bar.close()
        del keep
    return build_report(dst, t.name, fallbacks=parse_fallbacks(log.text),
                        imatrix=im.label if im is not None else None, imatrix_entries=n_used)
