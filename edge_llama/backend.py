"""Process-wide llama.cpp setup: initialise once, keep the one log bridge installed."""
from __future__ import annotations

import ctypes
import os
import platform
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import llama_cpp

from .log import LogBridge, LogCapture

_init_lock = threading.Lock()
_bridge: LogBridge | None = None


def ensure_backend() -> LogBridge:
    """Initialise llama.cpp once per process; (re)install the log bridge.

    The log callback is process-wide and other code (llama-cpp-python's `Llama`)
    may replace it; loads need it to explain failures, so every load puts it back.
    """
    global _bridge
    with _init_lock:
        if _bridge is None:
            _bridge = LogBridge()
            llama_cpp.llama_backend_init()
            load_dynamic_backends()
            return_freed_memory()
        _bridge.install()
        return _bridge


def load_dynamic_backends() -> None:
    """Load the backend libraries of a GGML_BACKEND_DL build from llama_cpp/lib.

    Such a build (one wheel for every ARM64 core: a CPU backend per feature level,
    GGML_CPU_ALL_VARIANTS) registers no device until its backends are loaded, and
    ggml looks for them beside the executable (python), not beside libggml; ggml
    then keeps the best CPU variant this CPU can run. A build with backends linked
    in already has its CPU device: nothing to do.
    """
    from .ggml_devices import open_lib

    libggml = open_lib("ggml")  # the copy libllama links (llama_cpp._ggml opens a second one)
    libggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    libggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    if libggml.ggml_backend_dev_by_type(0):  # GGML_BACKEND_DEVICE_TYPE_CPU
        return
    libggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    libggml.ggml_backend_load_all_from_path.restype = None
    libggml.ggml_backend_load_all_from_path(str(Path(llama_cpp.__file__).resolve().parent / "lib").encode())


def take_errors() -> list[str]:
    """Pop the llama.cpp error lines logged since the last call."""
    return ensure_backend().take_errors()


def log_suffix(limit: int = 3) -> str:
    """": err1 | err2" of the last llama.cpp error lines, for an exception message ("" if none)."""
    errors = take_errors()
    return (": " + " | ".join(errors[-limit:])) if errors else ""


@contextmanager
def capture(on_line: Callable[[int, str], None] | None = None) -> Iterator[LogCapture]:
    """Collect llama.cpp (and mtmd) log text written inside the block."""
    with ensure_backend().capture(on_line) as cap:
        yield cap


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
HEAP_MMAP_THRESHOLD = 128 << 10


def return_freed_memory() -> bool:
    """Keep glibc's mmap threshold fixed so freed large buffers go back to the OS.

    glibc raises the threshold after each large free (up to 32 MB), so image
    preprocessing temporaries land on the heap and stay resident after they
    are freed: ~30 MB of a 2B model's peak RSS. A fixed threshold keeps them
    mmap'd. Skipped where the user tuned malloc or libc is not glibc.
    """
    if platform.system() != "Linux" or "GLIBC_TUNABLES" in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def system_info() -> tuple[str, str]:
    """(llama-cpp-python's version, llama.cpp's system info line)."""
    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(" |")
    return getattr(llama_cpp, "__version__", "unknown"), info
