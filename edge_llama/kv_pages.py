"""KV-cache pages in RAM only once a conversation uses them (Linux).

llama.cpp zeroes its whole KV buffer when it creates a context, so that padding
cells never hold NaN. Writing the zeros makes every page resident at once: a
2B model's f16 cache at n_ctx 4096 is 448 MiB of RAM before the first token,
though a photo question fills a few hundred of its 4096 cells. On a 4 GB board
that is the difference between fitting beside a browser and not.

A private anonymous page that holds only zeros can be handed back to the kernel
with MADV_DONTNEED without changing anything a reader sees: the next access
maps a fresh zero-filled page. So after the context is made, the resident
all-zero runs the size of the KV buffer, in memory llama.cpp mapped while making
it, are handed back; the cache then grows in RAM as the conversation does.
The planners (`--plan`, the fit checks) still count the whole cache: a full
context does reach it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import re
import sys

import numpy as np

log = logging.getLogger("edge_llama")

PAGE = mmap.PAGESIZE
MADV_DONTNEED = 4  # <sys/mman.h> on Linux
# llama_kv_cache's line per buffer: "llama_kv_cache:        CPU KV buffer size =   448.00 MiB"
_KV_LINE = re.compile(r"\b(CPU\w*) KV buffer size =\s*([0-9.]+) MiB")
# A run counts as the KV buffer when it holds at least this share of the logged size
# (the log rounds to 0.01 MiB; the run loses at most a page at either end).
_MIN_SHARE = 0.99

Mapping = tuple[int, int]  # [start, end) of an anonymous private read-write mapping


def host_kv_bytes(load_log: str) -> list[int]:
    """Sizes of the host-memory KV buffers a context's creation logged (GPU buffers are not ours to touch)."""
    return [int(float(m.group(2)) * (1 << 20)) for m in _KV_LINE.finditer(load_log)]


def anonymous_mappings() -> set[Mapping]:
    """This process's private anonymous read-write mappings (where malloc puts llama.cpp's buffers)."""
    out: set[Mapping] = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 5 and parts[1] == "rw-p":  # no path: anonymous
                    lo, hi = parts[0].split("-")
                    out.add((int(lo, 16), int(hi, 16)))
    except OSError:  # no /proc (macOS, a sandbox): nothing to find, nothing handed back
        pass
    return out


def libc() -> ctypes.CDLL | None:
    """libc with madvise and mincore typed (None off Linux: no page is handed back there)."""
    if not sys.platform.startswith("linux"):
        return None
    lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return lib


def runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[first, last+1) index runs where `flags` is true."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], flags.astype(np.int8), [0]))))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def zero_pages(addr: int, n_pages: int) -> np.ndarray:
    """Per page of [addr, addr + n_pages pages): whether it holds only zeros (read in 32 MiB blocks)."""
    words = np.frombuffer((ctypes.c_uint8 * (n_pages * PAGE)).from_address(addr), dtype=np.uint64)
    pages = words.reshape(n_pages, PAGE // 8)
    block = (32 << 20) // PAGE
    return np.concatenate([~pages[i:i + block].any(axis=1) for i in range(0, n_pages, block)])


def release_zeroed_kv(before: set[Mapping], kv_sizes: list[int]) -> int:
    """Hand back the resident all-zero page runs of at least each KV size, in mappings new since `before`.

    Returns the bytes handed back (0 where nothing matched or off Linux: then
    nothing is touched). Only pages read as all zeros just before are handed
    back, so no value anyone reads changes.
    """
    lib = libc()
    if lib is None or not kv_sizes:
        return 0
    need = min(kv_sizes) * _MIN_SHARE
    released = 0
    for lo, hi in sorted(anonymous_mappings() - before):
        n = (hi - lo) // PAGE
        if n * PAGE < need:
            continue
        resident = np.zeros(n, dtype=np.uint8)
        if lib.mincore(lo, hi - lo, resident.ctypes.data) != 0:
            continue
        for first, last in runs(resident & 1):
            if (last - first) * PAGE < need:
                continue
            base = lo + first * PAGE
            for z0, z1 in runs(zero_pages(base, last - first)):
                size = (z1 - z0) * PAGE
                if size >= need and lib.madvise(base + z0 * PAGE, size, MADV_DONTNEED) == 0:
                    released += size
    if released:
        log.debug("KV cache: %.0f MiB of zeroed pages handed back until the conversation uses them",
                  released / (1 << 20))
    return released
