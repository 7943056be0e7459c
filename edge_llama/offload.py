"""Where the work runs: GPU layers, the projector's device and its free memory, flash attention.

Which backend exists (CPU, CUDA, Metal) is fixed by how llama-cpp-python was
compiled; this module only asks llama.cpp and ggml's devices what they have and
picks the settings a load needs.
"""
from __future__ import annotations

import logging

from .errors import LoadOptionError
from .ggml_devices import DEVICE_CPU, DEVICE_GPU, DEVICE_IGPU, has_local_gpu, local_devices
from .kv import KVType
from .objects import FLASH_ATTN_AUTO, FLASH_ATTN_OFF, FLASH_ATTN_ON

log = logging.getLogger("edge_llama")


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
        raise LoadOptionError(f"flash_attn must be 'auto', True or False, got {flash_attn!r}")
    choice = _FLASH[key]
    if v_type.quantized:
        if choice == FLASH_ATTN_OFF:
            raise LoadOptionError(
                f"a quantized V cache ({v_type.name}) needs flash attention; "
                "use flash_attn='auto' or True, or kv_cache_type_v='f16'"
            )
        if choice != FLASH_ATTN_ON:
            log.warning("quantized V cache (%s) needs flash attention: turning it on", v_type.name)
        return FLASH_ATTN_ON
    return choice

