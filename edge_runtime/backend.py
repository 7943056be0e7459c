"""Runtime hardware choices (GPU offload, flash attention) over the edge_llama access layer.

Which backend exists (CPU, CUDA, Metal) is fixed by how llama-cpp-python was
compiled; this module only asks llama.cpp what it has and picks settings.
Loading, logs, KV types and threads live in `edge_llama`; the names below are
re-exported for the runtime's modules.
"""
from __future__ import annotations

import logging
import platform

from edge_llama.ggml_devices import DEVICE_CPU, DEVICE_GPU, DEVICE_IGPU, has_local_gpu, local_devices
from edge_llama import (CPU_UBATCH, FLASH_ATTN_AUTO, FLASH_ATTN_OFF, FLASH_ATTN_ON, KV_TYPES, KVType, ensure_backend,
                        kv_type, physical_cores, take_errors)
from edge_llama.errors import LoadOptionError
from edge_llama.hardware import parse_cpuinfo_cores
from edge_llama.params import resolve_mmap, resolve_ubatch

log = logging.getLogger("edge_runtime")

__all__ = ["CPU_UBATCH", "KV_TYPES", "KVType", "ensure_backend", "gpu_offload_available", "kv_type",
           "parse_cpuinfo_cores", "peak_rss_bytes", "physical_cores", "projector_free_bytes", "projector_on_gpu",
           "resolve_flash_attn", "resolve_gpu_layers",
           "resolve_mmap", "resolve_ubatch", "take_errors"]


def gpu_offload_available() -> bool:
    """A local GPU backend exists (llama_supports_gpu_offload is also true for RPC-only builds)."""
    return has_local_gpu()


def projector_on_gpu(mmproj_gpu: bool | None, n_gpu_layers: int) -> bool:
    """Where the projector runs: as asked, else on a local GPU when the text model's layers are offloaded."""
    return bool(mmproj_gpu) if mmproj_gpu is not None else (n_gpu_layers != 0 and gpu_offload_available())


def projector_free_bytes(on_gpu: bool) -> int | None:
    """Free memory of the device the projector runs on (the first local GPU, else the CPU), as ggml
    reports it; None when ggml reports nothing."""
    kinds = (DEVICE_GPU, DEVICE_IGPU) if on_gpu else (DEVICE_CPU,)
    free = next((d.free for d in local_devices() if d.kind in kinds), 0)
    return free or None


def resolve_gpu_layers(n_gpu_layers: int | str) -> int:
    """"auto" offloads every layer when a GPU backend is compiled in, else none."""
    if n_gpu_layers == "auto":
        return -1 if gpu_offload_available() else 0
    if isinstance(n_gpu_layers, bool) or not isinstance(n_gpu_layers, int):
        raise LoadOptionError(f"n_gpu_layers must be 'auto' or an int, got {n_gpu_layers!r}")
    return n_gpu_layers


_FLASH = {
    "auto": FLASH_ATTN_AUTO,
    True: FLASH_ATTN_ON,
    False: FLASH_ATTN_OFF,
    "on": FLASH_ATTN_ON,
    "off": FLASH_ATTN_OFF,
}


def resolve_flash_attn(flash_attn: bool | str, v_type: KVType) -> int:
    """llama.cpp stores a quantized V cache only with flash attention: switch it on."""
    key = flash_attn.lower() if isinstance(flash_attn, str) else flash_attn
    if key not in _FLASH:
        raise ValueError(f"flash_attn must be 'auto', True or False, got {flash_attn!r}")
    choice = _FLASH[key]
    if v_type.quantized:
        if choice == FLASH_ATTN_OFF:
            raise ValueError(
                f"a quantized V cache ({v_type.name}) needs flash attention; "
                "use flash_attn='auto' or True, or kv_cache_type_v='f16'"
            )
        if choice != FLASH_ATTN_ON:
            log.warning("quantized V cache (%s) needs flash attention: turning it on", v_type.name)
        return FLASH_ATTN_ON
    return choice


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if platform.system() == "Darwin" else peak * 1024)
