"""llama.cpp's CPU "extra" buffer types (AMX, CPU_REPACK, ...), read with ggml's device API.

llama.cpp puts a weight in the first extra buffer type that supports its
matmul (AMX before CPU_REPACK, ggml-cpu.cpp ggml_backend_cpu_get_extra_buffer_types).
To keep repacking without AMX we need the CPU_REPACK handle itself, for
llama_model_params.tensor_buft_overrides; ggml exposes it only through the CPU
device's "ggml_backend_dev_get_extra_bufts" proc address (libggml in llama_cpp/lib).
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

GGML_BACKEND_DEVICE_TYPE_CPU = 0  # ggml-backend.h enum ggml_backend_dev_type

AMX = "AMX"
CPU_REPACK = "CPU_REPACK"


@dataclass(frozen=True)
class BufferType:
    name: str
    handle: int  # ggml_backend_buffer_type_t


def lib_dir() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).resolve().parent / "lib"


@functools.lru_cache(maxsize=1)
def _ggml() -> ctypes.CDLL:
    from .ggml_devices import open_lib

    # the libggml libllama links: llama_cpp._ggml opens libggml.so, a second copy whose device
    # registry a build with dynamically loaded backends leaves empty
    lib = open_lib("ggml")

    lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    lib.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    lib.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_buft_name.restype = ctypes.c_char_p
    return lib


_GetExtraBufts = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)


@functools.lru_cache(maxsize=1)
def cpu_extra_buffer_types() -> tuple[BufferType, ...]:
    """The CPU device's extra buffer types in llama.cpp's order of preference (empty if none)."""
    from .backend import ensure_backend

    ensure_backend()
    lib = _ggml()
    dev = lib.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    if not dev:
        return ()
    reg = lib.ggml_backend_dev_backend_reg(dev)
    addr = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not addr:
        return ()
    array = _GetExtraBufts(addr)(dev)
    out = []
    i = 0
    while array and array[i]:
        out.append(BufferType(lib.ggml_backend_buft_name(array[i]).decode(), array[i]))
        i += 1
    return tuple(out)


def find(name: str) -> BufferType | None:
    return next((b for b in cpu_extra_buffer_types() if b.name == name), None)
