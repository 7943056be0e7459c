"""Process-wide llama.cpp setup and hardware choices (threads, GPU offload, KV types).

Which backend exists (CPU, CUDA, Metal) is fixed by how llama-cpp-python was
compiled; this module only asks llama.cpp what it has and picks settings.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import platform
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
from edge_llama.ggml_devices import has_local_gpu

log = logging.getLogger("edge_runtime")
_llama_log = logging.getLogger("edge_runtime.llama_cpp")

# ggml log levels (ggml.h): NONE, DEBUG, INFO, WARN, ERROR, CONT.
# llama.cpp talks a lot; its failures reach users as exceptions carrying the error
# lines, so nothing here needs to pass logging's default WARNING threshold.
_GGML_TO_LOGGING = {
    1: logging.DEBUG,
    2: logging.DEBUG,
    3: logging.DEBUG,  # warnings are mostly advisory ("n_ctx_seq < n_ctx_train")
    4: logging.INFO,
}
_CONT = 5


class _LogBridge:
    """Routes llama.cpp / mtmd logs into `logging` and remembers recent errors.

    llama.cpp reports why a load failed only through its log, so the runtime
    keeps the last error lines to put them into the exception it raises.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._level = 2
        self._partial = ""
        self.errors: collections.deque[str] = collections.deque(maxlen=32)
        self.captured: list[str] | None = None  # every line, while a load wants them
        # Keep a reference: ctypes callbacks are freed with their Python object.
        self._callback = llama_cpp.llama_log_callback(self._on_log)

    def _on_log(self, level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        try:
            chunk = text.decode("utf-8", errors="replace") if text else ""
            with self._lock:
                if level != _CONT:
                    self._level = level
                self._partial += chunk
                if "\n" not in self._partial:
                    return
                *done, self._partial = self._partial.split("\n")
                level_now = self._level
            for line in done:
                if not line.strip():
                    continue
                if self.captured is not None:
                    self.captured.append(line)
                if level_now >= 4:
                    self.errors.append(line)
                _llama_log.log(_GGML_TO_LOGGING.get(level_now, logging.DEBUG), "%s", line)
        except Exception:  # a C callback must never raise
            pass

    def install(self) -> None:
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        mtmd.mtmd_helper_log_set(self._callback, ctypes.c_void_p(0))

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[str]]:
        """Collect every log line in the block (llama.cpp tells where layers went only in its log)."""
        lines: list[str] = []
        with self._lock:
            self.captured = lines
        try:
            yield lines
        finally:
            with self._lock:
                self.captured = None

    def take_errors(self) -> list[str]:
        with self._lock:
            errors = list(self.errors)
            self.errors.clear()
        return errors


_init_lock = threading.Lock()
_bridge: _LogBridge | None = None


def ensure_backend() -> _LogBridge:
    """Initialise llama.cpp once per process; (re)install the log bridge.

    The log callback is process-wide and other code may replace it; the engine
    needs it to explain load failures, so every load puts it back.
    """
    global _bridge
    with _init_lock:
        if _bridge is None:
            _bridge = _LogBridge()
            llama_cpp.llama_backend_init()
            return_freed_memory()
        _bridge.install()
        return _bridge


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


def take_errors() -> list[str]:
    """Pop the llama.cpp error lines logged since the last call."""
    return ensure_backend().take_errors()


def gpu_offload_available() -> bool:
    """A local GPU backend exists (llama_supports_gpu_offload is also true for RPC-only builds)."""
    return has_local_gpu()


def resolve_gpu_layers(n_gpu_layers: int | str) -> int:
    """"auto" offloads every layer when a GPU backend is compiled in, else none."""
    if n_gpu_layers == "auto":
        return -1 if gpu_offload_available() else 0
    if isinstance(n_gpu_layers, bool) or not isinstance(n_gpu_layers, int):
        raise ValueError(f"n_gpu_layers must be 'auto' or an int, got {n_gpu_layers!r}")
    return n_gpu_layers


# ---------------------------------------------------------------- loading weights

# On a CPU, prompt evaluation is compute-bound: 64 tokens per forward pass
# already run at full speed (2B q4_k_m, 2 cores: 31-33 tok/s at 64, 128 and
# 512), while the compute buffer grows with it (logits are n_ubatch x n_vocab).
CPU_UBATCH = 64


def resolve_mmap(mmap: bool | str, n_gpu_layers: int, repack: bool) -> bool:
    """"auto": read the file instead of mapping it when CPU layers are repacked.

    Repacking copies the CPU matrices into an interleaved layout; with mmap
    the file's pages of those matrices stay resident beside the copy (+670 MB
    for a 2B q4_k_m), so one plain read is smaller. When layers run on a GPU
    (or nothing is repacked) mmap costs nothing and loads faster.
    """
    if mmap == "auto":
        return n_gpu_layers != 0 or not repack
    if isinstance(mmap, bool):
        return mmap
    raise ValueError(f"mmap must be 'auto', True or False, got {mmap!r}")


def resolve_ubatch(n_ubatch: int | None, n_batch: int, n_gpu_layers: int) -> int:
    """None: the whole batch on a GPU, at most CPU_UBATCH tokens on the CPU."""
    if n_ubatch is not None:
        return min(n_ubatch, n_batch)
    return n_batch if n_gpu_layers != 0 else min(n_batch, CPU_UBATCH)


def model_params(n_gpu_layers: int = 0, *, mmap: bool = True, repack: bool = True, placement: Any = None) -> Any:
    """llama_model_params for one load; every loader in the package builds them here.

    `placement` (edge_llama.placement.Placement) adds RPC workers: it sets the
    devices, n_gpu_layers and tensor_split, and must outlive the load call.
    """
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    params.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP if mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
    params.use_extra_bufts = repack
    if placement is not None:
        placement.apply(params)
    return params


# ---------------------------------------------------------------- threads


def parse_cpuinfo_cores(cpuinfo: str) -> int:
    """Count distinct (physical id, core id) pairs in /proc/cpuinfo text; 0 if absent."""
    cores: set[tuple[str, str]] = set()
    physical = core = None
    for line in cpuinfo.splitlines() + [""]:
        if not line.strip():
            if core is not None:
                cores.add((physical or "0", core))
            physical = core = None
            continue
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            core = value.strip()
    return len(cores)


def physical_cores() -> int:
    """Physical cores usable by this process (SMT siblings slow llama.cpp down)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = 0
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "hw.perflevel0.physicalcpu"], capture_output=True, text=True, check=False
            ).stdout.strip() or subprocess.run(
                ["sysctl", "-n", "hw.physicalcpu"], capture_output=True, text=True, check=False
            ).stdout.strip()
            cores = int(out) if out else 0
        except (OSError, ValueError):
            cores = 0
    else:
        try:
            cores = parse_cpuinfo_cores(Path("/proc/cpuinfo").read_text())
        except OSError:
            cores = 0
    if cores <= 0:
        cores = logical
    return max(1, min(cores, logical))


# ---------------------------------------------------------------- KV cache types


@dataclass(frozen=True)
class KVType:
    name: str
    ggml_type: int
    block_elems: int
    block_bytes: int

    @property
    def quantized(self) -> bool:
        return self.block_elems > 1

    def row_bytes(self, n_elems: int) -> int:
        return (n_elems // self.block_elems) * self.block_bytes


KV_TYPES: dict[str, KVType] = {
    t.name: t
    for t in (
        KVType("f32", llama_cpp.GGML_TYPE_F32, 1, 4),
        KVType("f16", llama_cpp.GGML_TYPE_F16, 1, 2),
        KVType("bf16", 30, 1, 2),  # GGML_TYPE_BF16
        KVType("q8_0", llama_cpp.GGML_TYPE_Q8_0, 32, 34),
        KVType("q5_1", llama_cpp.GGML_TYPE_Q5_1, 32, 24),
        KVType("q5_0", llama_cpp.GGML_TYPE_Q5_0, 32, 22),
        KVType("q4_1", llama_cpp.GGML_TYPE_Q4_1, 32, 20),
        KVType("q4_0", llama_cpp.GGML_TYPE_Q4_0, 32, 18),
        KVType("iq4_nl", llama_cpp.GGML_TYPE_IQ4_NL, 32, 18),
    )
}


def kv_type(name: str) -> KVType:
    try:
        return KV_TYPES[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown KV cache type {name!r}; choose one of {', '.join(KV_TYPES)}") from None


_FLASH = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


def resolve_flash_attn(flash_attn: bool | str, v_type: KVType) -> int:
    """llama.cpp stores a quantized V cache only with flash attention: switch it on."""
    key = flash_attn.lower() if isinstance(flash_attn, str) else flash_attn
    if key not in _FLASH:
        raise ValueError(f"flash_attn must be 'auto', True or False, got {flash_attn!r}")
    choice = _FLASH[key]
    if v_type.quantized:
        if choice == llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED:
            raise ValueError(
                f"a quantized V cache ({v_type.name}) needs flash attention; "
                "use flash_attn='auto' or True, or kv_cache_type_v='f16'"
            )
        if choice != llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED:
            log.warning("quantized V cache (%s) needs flash attention: turning it on", v_type.name)
        return llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    return choice


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if platform.system() == "Darwin" else peak * 1024)
