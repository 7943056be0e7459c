"""llama_model_quantize, the function behind llama-quantize, with its C arguments built here.

`quant.text` decides the type, the imatrix and the metadata; this module only
turns them into llama_model_quantize_params (the imatrix as the NULL-terminated
{name, float*, size} array and the kv overrides as the empty-key-terminated
array tools/quantize/quantize.cpp builds) and keeps every buffer alive for the call.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Mapping

import numpy as np
import llama_cpp as L

from .backend import ensure_backend
from .errors import LlamaError


def quantize_file(src: str | Path, dst: str | Path, ftype: int, *, nthread: int = 0, pure: bool = False, dry_run: bool = False,
                  imatrix: Mapping[str, np.ndarray] | None = None,
                  metadata: Mapping[str, str | int] | None = None) -> None:
    """Quantize `src` to `dst` with llama-quantize's default params plus these; raise LlamaError on failure.

    `imatrix`: tensor name -> sum/count per column; `metadata`: keys written as str or int overrides.
    llama.cpp logs what it did (each tensor's type, fallbacks, progress): read it with `capture`.
    """
    ensure_backend()
    params = L.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = int(nthread)
    params.pure = bool(pure)
    params.dry_run = bool(dry_run)  # type every tensor, read and write nothing (dst unused)
    keep: list[object] = []
    if imatrix is not None:
        values = {n: np.ascontiguousarray(v, dtype=np.float32) for n, v in imatrix.items()}
        names = {n: n.encode() for n in values}
        arr = (L.llama_model_imatrix_data * (len(values) + 1))()
        for i, (n, v) in enumerate(values.items()):
            arr[i].name = names[n]
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.size
        arr[len(values)].name = None  # terminator
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(L.llama_model_imatrix_data))
        keep += [values, names, arr]
    if metadata:
        kv = (L.llama_model_kv_override * (len(metadata) + 1))()
        for i, (key, val) in enumerate(metadata.items()):
            kv[i].key = key.encode()
            if isinstance(val, str):
                kv[i].tag = L.LLAMA_KV_OVERRIDE_TYPE_STR
                kv[i].value.val_str = val.encode()[:127]
            else:
                kv[i].tag = L.LLAMA_KV_OVERRIDE_TYPE_INT
                kv[i].value.val_i64 = int(val)
        kv[len(metadata)].key = b""  # terminator: empty key
        params.kv_overrides = ctypes.cast(kv, ctypes.POINTER(L.llama_model_kv_override))
        keep.append(kv)
    rc = L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    del keep
    if rc != 0:
        raise LlamaError(f"llama_model_quantize returned {rc}")

