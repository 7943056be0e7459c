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

The pages are read through /proc/self/mem, never through a pointer: memory
another thread (or a finalizer) unmaps meanwhile is then a failed read, not a
segmentation fault. Only addresses that no mapping held before the call are
looked at (the kernel merges a new mapping with an old neighbour into one line
of /proc/self/maps, so the old line's span is cut out, not just the old line).
The planners (`--plan`, the fit checks) still count the whole cache: a full
context does reach it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import mmap
import os
import re
import sys
from contextlib import contextmanager
from typing import Iterator

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
BLOCK = 1 << 20  # bytes per /proc/self/mem read: a small scratch stays in cache (1 MiB: 448 MiB in ~0.1 s)


def host_kv_bytes(load_log: str) -> list[int]:
    """Sizes of the host-memory KV buffers a context's creation logged (GPU buffers are not ours to touch)."""
    return [int(float(m.group(2)) * (1 << 20)) for m in _KV_LINE.finditer(load_log)]


def anonymous_mappings() -> list[Mapping]:
    """This process's private anonymous read-write mappings (where malloc puts llama.cpp's buffers), sorted."""
    out: list[Mapping] = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 5 and parts[1] == "rw-p":  # no path: anonymous
                    lo, hi = parts[0].split("-")
                    out.append((int(lo, 16), int(hi, 16)))
    except OSError:  # no /proc (macOS, a sandbox): nothing to find, nothing handed back
        pass
    return sorted(out)


def new_spans(before: list[Mapping], after: list[Mapping]) -> list[Mapping]:
    """The parts of `after` that no span of `before` covered (both sorted, non-overlapping)."""
    out: list[Mapping] = []
    i = 0
    for lo, hi in after:
        while i < len(before) and before[i][1] <= lo:
            i += 1
        j, cur = i, lo
        while j < len(before) and before[j][0] < hi:
            if before[j][0] > cur:
                out.append((cur, before[j][0]))
            cur = max(cur, before[j][1])
            j += 1
        if cur < hi:
            out.append((cur, hi))
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


def open_own_memory() -> int | None:
    """A descriptor on /proc/self/mem that reads this process's own addresses, or None.

    Checked on a buffer of our own: under an emulator (QEMU user mode) the file
    is the host process's memory, where the guest's addresses may sit elsewhere.
    """
    try:
        fd = os.open("/proc/self/mem", os.O_RDONLY)
    except OSError:
        return None
    probe = np.arange(PAGE // 8, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    back = np.zeros_like(probe)
    try:
        ok = os.preadv(fd, [memoryview(back).cast("B")], probe.ctypes.data) == probe.nbytes
    except OSError:
        ok = False
    if ok and np.array_equal(probe, back):
        return fd
    os.close(fd)
    return None


def zero_pages(fd: int, addr: int, n_pages: int, scratch: np.ndarray) -> np.ndarray:
    """Per page of [addr, addr + n_pages pages): whether it reads as only zeros (unreadable pages: no)."""
    flags = np.zeros(n_pages, dtype=bool)
    per_block = scratch.nbytes // PAGE
    view = memoryview(scratch).cast("B")
    for first in range(0, n_pages, per_block):
        count = min(per_block, n_pages - first)
        try:
            got = os.preadv(fd, [view[:count * PAGE]], addr + first * PAGE) // PAGE
        except OSError:  # unmapped meanwhile: nothing of it is handed back
            continue
        pages = scratch[:got * (PAGE // 8)].reshape(got, PAGE // 8)
        flags[first:first + got] = ~pages.any(axis=1)
    return flags


@contextmanager
def no_collection() -> Iterator[None]:
    """No garbage collection meanwhile: a finalizer could free or write memory between a read and its madvise."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def release_zeroed_kv(before: list[Mapping], kv_sizes: list[int]) -> int:
    """Hand back the resident all-zero page runs of at least each KV size, in memory mapped since `before`.

    Returns the bytes handed back (0 where nothing matched, off Linux, or where
    /proc/self/mem does not read our own memory: then nothing is touched). Only
    pages read as all zeros just before are handed back, so no value anyone
    reads changes.
    """
    lib = libc()
    if lib is None or not kv_sizes:
        return 0
    need = min(kv_sizes) * _MIN_SHARE
    released = 0
    with no_collection():
        fd = open_own_memory()
        if fd is None:
            log.debug("KV cache: /proc/self/mem does not read this process's memory; pages stay resident")
            return 0
        try:
            spans = [(lo, hi) for lo, hi in new_spans(before, anonymous_mappings()) if hi - lo >= need]
            scratch = np.empty(BLOCK // 8, dtype=np.uint64) if spans else None
            for lo, hi in spans:
                n = (hi - lo) // PAGE
                resident = np.zeros(n, dtype=np.uint8)
                if lib.mincore(lo, hi - lo, resident.ctypes.data) != 0:
                    continue
                for first, last in runs(resident & 1):
                    if (last - first) * PAGE < need:
                        continue
                    base = lo + first * PAGE
                    for z0, z1 in runs(zero_pages(fd, base, last - first, scratch)):
                        size = (z1 - z0) * PAGE
                        if size >= need and lib.madvise(base + z0 * PAGE, size, MADV_DONTNEED) == 0:
                            released += size
        finally:
            os.close(fd)
    if released:
        log.debug("KV cache: %.0f MiB of zeroed pages handed back until the conversation uses them",
                  released / (1 << 20))
    return released
