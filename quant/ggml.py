"""ctypes binding to ggml's own quantizer in libggml-base (installed by llama-cpp-python).

llama-cpp-python binds libllama and libmtmd but not the ggml row quantizer, and
the projector must be quantized with exactly the code llama.cpp uses, so we load
libggml-base from the installed llama_cpp package and call
`ggml_quantize_chunk` directly. The library is found without importing
llama_cpp (importing it loads libllama too, which is not needed here).
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from .errors import QuantError

_LIB_NAMES = {"linux": "libggml-base.so", "darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}
ROWS_PER_TASK_ELEMENTS = 1 << 20  # about 4 MiB of float32 input per quantize call


def library_path() -> Path:
    """libggml-base inside the installed llama_cpp package (or $LLAMA_CPP_LIB_PATH)."""
    name = _LIB_NAMES.get(sys.platform, "libggml-base.so")
    dirs: list[Path] = []
    if os.environ.get("LLAMA_CPP_LIB_PATH"):
        dirs.append(Path(os.environ["LLAMA_CPP_LIB_PATH"]))
    spec = importlib.util.find_spec("llama_cpp")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            dirs += [Path(loc) / "lib", Path(loc)]
    for d in dirs:
        if (d / name).exists():
            return d / name
    raise QuantError(
        f"cannot find {name} (looked in {', '.join(map(str, dirs)) or 'nothing: llama_cpp is not installed'}); "
        "install llama-cpp-python==0.3.36 (pip install -e .) or set LLAMA_CPP_LIB_PATH to its lib folder."
    )


@functools.lru_cache(maxsize=1)
def lib() -> ctypes.CDLL:
    """The loaded library with argument types declared (loaded once per process)."""
    h = ctypes.CDLL(str(library_path()))
    c_type = ctypes.c_int
    h.ggml_quantize_chunk.argtypes = [c_type, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                      ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    h.ggml_quantize_chunk.restype = ctypes.c_size_t
    h.ggml_row_size.argtypes = [c_type, ctypes.c_int64]
    h.ggml_row_size.restype = ctypes.c_size_t
    h.ggml_blck_size.argtypes = [c_type]
    h.ggml_blck_size.restype = ctypes.c_int64
    h.ggml_type_size.argtypes = [c_type]
    h.ggml_type_size.restype = ctypes.c_size_t
    h.ggml_type_name.argtypes = [c_type]
    h.ggml_type_name.restype = ctypes.c_char_p
    h.ggml_quantize_requires_imatrix.argtypes = [c_type]
    h.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    h.ggml_quantize_init.argtypes = [c_type]
    h.ggml_quantize_init.restype = None
    h.ggml_validate_row_data.argtypes = [c_type, ctypes.c_void_p, ctypes.c_size_t]
    h.ggml_validate_row_data.restype = ctypes.c_bool
    return h


def row_size(t: GGMLQuantizationType, n_per_row: int) -> int:
    return int(lib().ggml_row_size(int(t), n_per_row))


def block_size(t: GGMLQuantizationType) -> int:
    return int(lib().ggml_blck_size(int(t)))


def type_size(t: GGMLQuantizationType) -> int:
    return int(lib().ggml_type_size(int(t)))


def type_name(t: GGMLQuantizationType) -> str:
    return lib().ggml_type_name(int(t)).decode()


def requires_imatrix(t: GGMLQuantizationType) -> bool:
    """ggml's own rule: these types assert on a NULL imatrix (would abort the process)."""
    return bool(lib().ggml_quantize_requires_imatrix(int(t)))


def quantize_init(t: GGMLQuantizationType) -> None:
    """Build the type's lookup tables once, before threads share them."""
    lib().ggml_quantize_init(int(t))


def _as_f32_rows(data: np.ndarray) -> np.ndarray:
    rows = np.ascontiguousarray(data, dtype=np.float32)
    return rows.reshape(-1, rows.shape[-1]) if rows.ndim != 2 else rows


def quantize(t: GGMLQuantizationType, data: np.ndarray, imatrix: np.ndarray | None = None,
             *, nthread: int = 1) -> np.ndarray:
    """Quantize float rows (last axis = row) to ggml type `t`; returns the raw bytes (uint8).

    Rows are cut into independent chunks quantized in parallel threads
    (ctypes releases the GIL); the output is byte-identical to one call.
    """
    rows = _as_f32_rows(data)
    nrows, n_per_row = rows.shape
    if n_per_row % block_size(t):
        raise QuantError(f"row length {n_per_row} is not a multiple of the {type_name(t)} block size {block_size(t)}")
    imat = None
    if imatrix is not None:
        imat = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if imat.size != n_per_row:
            raise QuantError(f"imatrix has {imat.size} values for rows of {n_per_row}")
    if requires_imatrix(t) and imat is None:
        raise QuantError(f"ggml type {type_name(t)} cannot be quantized without an importance matrix")
    rsize = row_size(t, n_per_row)
    out = np.empty(nrows * rsize, dtype=np.uint8)
    quantize_init(t)
    step = max(1, ROWS_PER_TASK_ELEMENTS // n_per_row)
    imat_ptr = imat.ctypes.data if imat is not None else None
    h = lib()

    def run(start: int) -> int:
        n = min(step, nrows - start)
        # src/dst point at the first row of the chunk; start=0 keeps ggml's offsets trivial.
        return int(h.ggml_quantize_chunk(int(t), rows[start:].ctypes.data, out[start * rsize:].ctypes.data,
                                         0, n, n_per_row, imat_ptr))

    starts = range(0, nrows, step)
    if nthread > 1 and len(starts) > 1:
        with ThreadPoolExecutor(max_workers=nthread) as pool:
            written = sum(pool.map(run, starts))
    else:
        written = sum(run(s) for s in starts)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    if not h.ggml_validate_row_data(int(t), out.ctypes.data, out.nbytes):
        raise QuantError(f"ggml rejected the quantized {type_name(t)} data (non-finite input values?)")
    return out
