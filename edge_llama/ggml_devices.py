"""ggml's device registry (CPU, CUDA, Metal, RPC workers) through ctypes.

llama-cpp-python binds llama.h but not ggml-backend.h; device lists, free
memory and the RPC backend live there. The functions are read from the
shared libraries llama-cpp-python ships in `llama_cpp/lib` (already loaded by
`import llama_cpp`, so this opens no second copy).
"""
from __future__ import annotations

import ctypes
import functools
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import llama_cpp

# enum ggml_backend_dev_type (ggml-backend.h)
DEVICE_CPU, DEVICE_GPU, DEVICE_IGPU, DEVICE_ACCEL, DEVICE_META = range(5)
DEVICE_TYPE_NAMES = {DEVICE_CPU: "CPU", DEVICE_GPU: "GPU", DEVICE_IGPU: "iGPU", DEVICE_ACCEL: "accel", DEVICE_META: "meta"}


def lib_dir() -> Path:
    return Path(llama_cpp.__file__).resolve().parent / "lib"


def _mapped_paths() -> list[str]:
    """Shared objects this process has mapped (Linux); empty elsewhere."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return [line.split(None, 5)[5].strip() for line in f if line.count(" ") >= 5 and "/" in line]
    except OSError:
        return []


def open_lib(name: str) -> ctypes.CDLL | None:
    """`name` ("ggml-base", "ggml-rpc", ...) as llama.cpp itself loaded it, or None when not built.

    The wheel ships each library under several file names (libggml-base.so,
    .so.0, .so.0.25.3) as copies, not links: opening another name than the one
    libllama links against maps a second copy with its own globals (device
    registry, abort callback). So: the mapped file if any, else the SONAME-like
    versioned name, else the plain one.
    """
    stem = f"lib{name}"
    mapped = [p for p in _mapped_paths() if Path(p).name.startswith(stem + ".") and Path(p).parent == lib_dir()]
    if mapped:
        return ctypes.CDLL(mapped[0])
    suffix = {"Darwin": ".dylib", "Windows": ".dll"}.get(platform.system(), ".so")
    files = sorted(lib_dir().glob(f"{stem}*{suffix}*"), key=lambda p: (p.name.count("."), p.name))
    files = [f for f in files if f.name.startswith(stem + ".") or f.name == stem + suffix]
    versioned = [f for f in files if f.name != stem + suffix]
    for path in versioned[:1] + [f for f in files if f.name == stem + suffix]:
        return ctypes.CDLL(str(path))
    if platform.system() == "Windows":
        path = lib_dir() / f"{name}.dll"
        return ctypes.CDLL(str(path)) if path.exists() else None
    return None


def _bind(lib: ctypes.CDLL, name: str, argtypes: list, restype: object) -> object:
    fn = getattr(lib, name)
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


class _Registry:
    """The few ggml-backend.h functions the runtime needs, typed once."""

    def __init__(self) -> None:
        llama_cpp.llama_backend_init()  # registers the built-in backends
        base, ggml = open_lib("ggml-base"), open_lib("ggml")
        if base is None or ggml is None:
            raise OSError(f"ggml libraries not found in {lib_dir()}")
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        self.dev_count = _bind(ggml, "ggml_backend_dev_count", [], sz)
        self.dev_get = _bind(ggml, "ggml_backend_dev_get", [sz], vp)
        self.dev_by_name = _bind(ggml, "ggml_backend_dev_by_name", [ctypes.c_char_p], vp)
        self.dev_name = _bind(base, "ggml_backend_dev_name", [vp], ctypes.c_char_p)
        self.dev_description = _bind(base, "ggml_backend_dev_description", [vp], ctypes.c_char_p)
        self.dev_memory = _bind(base, "ggml_backend_dev_memory", [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)], None)
        self.dev_type = _bind(base, "ggml_backend_dev_type", [vp], ctypes.c_int)
        self.dev_backend_reg = _bind(base, "ggml_backend_dev_backend_reg", [vp], vp)
        self.reg_name = _bind(base, "ggml_backend_reg_name", [vp], ctypes.c_char_p)
        self.reg_dev_count = _bind(base, "ggml_backend_reg_dev_count", [vp], sz)
        self.reg_dev_get = _bind(base, "ggml_backend_reg_dev_get", [vp, sz], vp)
        self.cpu_buffer_type = _bind(base, "ggml_backend_cpu_buffer_type", [], vp)
        self.dev_buffer_type = _bind(base, "ggml_backend_dev_buffer_type", [vp], vp)
        self.buft_name = _bind(base, "ggml_backend_buft_name", [vp], ctypes.c_char_p)
        abort_cb = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
        self.abort_callback_type = abort_cb
        self.set_abort_callback = _bind(base, "ggml_set_abort_callback", [abort_cb], vp)


@functools.lru_cache(maxsize=1)
def registry() -> _Registry:
    return _Registry()


@dataclass(frozen=True)
class Device:
    """One ggml device: `handle` is the ggml_backend_dev_t that llama_model_params.devices takes."""

    name: str
    description: str
    kind: int
    free: int
    total: int
    backend: str  # the registry it belongs to: "CPU", "CUDA", "Metal", "RPC", ...
    handle: int

    @property
    def is_rpc(self) -> bool:
        return self.backend == "RPC"


def describe(handle: int) -> Device:
    """Name, type and free/total memory of a device (an RPC device asks its worker)."""
    reg = registry()
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    reg.dev_memory(handle, ctypes.byref(free), ctypes.byref(total))
    backend_reg = reg.dev_backend_reg(handle)
    return Device(
        name=(reg.dev_name(handle) or b"").decode(),
        description=(reg.dev_description(handle) or b"").decode(),
        kind=int(reg.dev_type(handle)),
        free=int(free.value),
        total=int(total.value),
        backend=(reg.reg_name(backend_reg) or b"").decode() if backend_reg else "",
        handle=int(handle),
    )


def local_devices() -> list[Device]:
    """This machine's devices, registry order (CPU last on GPU builds); RPC workers excluded."""
    reg = registry()
    out = []
    for i in range(reg.dev_count()):
        handle = reg.dev_get(i)
        if handle and (reg.reg_name(reg.dev_backend_reg(handle)) or b"") != b"RPC":
            out.append(describe(handle))
    return out


def has_local_gpu() -> bool:
    """A GPU / integrated GPU on this machine (unlike llama_supports_gpu_offload, RPC does not count)."""
    return any(d.kind in (DEVICE_GPU, DEVICE_IGPU) for d in local_devices())


def buffer_types(more: Sequence[Device] = ()) -> dict[str, int]:
    """Each device's default buffer type by name ("CPU", "CUDA0", "RPC0[host:port]"), this machine's and
    `more` (RPC workers): the names llama.cpp's -ot/--override-tensor accepts (common/arg.cpp)."""
    reg = registry()
    out = {}
    for handle in [reg.dev_get(i) for i in range(reg.dev_count())] + [d.handle for d in more]:
        buft = reg.dev_buffer_type(handle)
        if buft:
            out[(reg.buft_name(buft) or b"").decode()] = int(buft)
    return out


def device_by_name(name: str) -> Device | None:
    handle = registry().dev_by_name(name.encode())
    return describe(handle) if handle else None
