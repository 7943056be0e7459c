"""Memory read bandwidth: the ceiling for LLM decode on a CPU.

Decode reads every weight once per token, so tok/s x bytes per token can be
at most what the memory delivers. We measure it the way decode uses it: a
read-only streaming pass over a buffer far larger than the last-level cache,
split over 1 and over the benchmark's thread count, best pass. The kernel is
libc's memchr looking for a byte that is not there: vectorised, no writes,
and ctypes releases the GIL so threads really run in parallel (numpy's
reductions reach ~15% less on the machines we tried; they are the fallback).
"""
from __future__ import annotations

import ctypes
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

DEFAULT_BYTES = 512 << 20  # 16x a 32 MB L3: caches cannot serve it


@dataclass(frozen=True)
class Bandwidth:
    bytes_per_s: float  # best pass over all thread counts tried
    buffer_bytes: int
    threads: int  # the thread count that gave the best pass
    passes: int
    kernel: str

    @property
    def gb_s(self) -> float:
        return self.bytes_per_s / 1e9

    def to_dict(self) -> dict:
        return {**asdict(self), "gb_s": self.gb_s}


@functools.cache
def _memchr() -> Callable | None:
    try:
        fn = ctypes.CDLL(None).memchr
    except (OSError, AttributeError, TypeError):
        return None
    fn.restype = ctypes.c_void_p
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    return fn


def read_kernel() -> tuple[str, Callable[[np.ndarray], object]]:
    """(name, function reading a zero-filled uint8 array once)."""
    memchr = _memchr()
    if memchr is not None:
        return "memchr", lambda part: memchr(part.ctypes.data, 1, part.nbytes)
    return "numpy max", lambda part: part.view(np.uint64).max()


def _pass_rate(read, parts: list[np.ndarray], pool: ThreadPoolExecutor, nbytes: int) -> float:
    t0 = time.perf_counter()
    list(pool.map(read, parts))
    return nbytes / (time.perf_counter() - t0)


def measure_read_bandwidth(threads: int = 1, nbytes: int = DEFAULT_BYTES, passes: int = 5) -> Bandwidth:
    """Best read rate with 1 and with `threads` threads (on small boards one thread can win)."""
    if threads < 1 or passes < 1 or nbytes < 1 << 20:
        # a plain ValueError: callers pass BenchOptions' validated numbers: a programming error
        raise ValueError("need threads >= 1, passes >= 1 and at least 1 MiB")
    name, read = read_kernel()
    buf = np.zeros(nbytes - nbytes % 64, dtype=np.uint8)
    buf.fill(0)  # touch every page so the passes read memory, not fresh zero pages
    best, best_threads = 0.0, 1
    for n in sorted({1, threads}):
        parts = np.array_split(buf, n)
        with ThreadPoolExecutor(n) as pool:
            _pass_rate(read, parts, pool, buf.nbytes)  # warm-up: page tables, thread start
            for _ in range(passes):
                rate = _pass_rate(read, parts, pool, buf.nbytes)
                if rate > best:
                    best, best_threads = rate, n
    return Bandwidth(best, buf.nbytes, best_threads, passes, name)
