"""KV pages handed back until used (edge_llama.kv_pages): less RAM, not one value changed.

The expected KV size is llama.cpp's own (its "KV buffer size" log line); the
resident memory is the kernel's (RssAnon in /proc/self/status); the logits of
a context that handed its pages back are compared bit for bit with one that
kept them, with and without flash attention, after the cache was filled to its
last cell and cleared again.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import sys

import numpy as np
import pytest

from edge_llama import Context, ContextOptions, Model
from edge_llama.backend import capture
from edge_llama.kv_pages import MADV_DONTNEED, PAGE, host_kv_bytes, libc, runs
from edge_llama.objects import FLASH_ATTN_OFF, FLASH_ATTN_ON

N_CTX = 32768  # the tiny model keeps 512 bytes a cell: a 16 MiB cache, plain to see in RssAnon


def rss_anon() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon line")


def madvise_frees_pages() -> bool:
    """Whether this kernel (not an emulator that ignores the hint) drops a written anonymous page."""
    lib = libc()
    buf = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.write(b"\1")
    view = ctypes.c_char.from_buffer(buf)
    addr, flag = ctypes.addressof(view), np.zeros(1, np.uint8)
    lib.madvise(addr, PAGE, MADV_DONTNEED)
    lib.mincore(addr, PAGE, flag.ctypes.data)
    gone = not flag[0] & 1 and buf[0] == 0
    del view
    buf.close()
    return gone


@pytest.fixture(scope="module")
def text_path(tiny_f32_dir):
    m = json.loads((tiny_f32_dir / "manifest.json").read_text())
    return tiny_f32_dir / m["text"]["path"]


def test_runs_finds_every_run():
    assert runs(np.array([0, 1, 1, 0, 1, 0, 0, 1], bool)) == [(1, 3), (4, 5), (7, 8)]
    assert runs(np.zeros(3, bool)) == []
    assert runs(np.ones(2, bool)) == [(0, 2)]


def test_host_kv_bytes_reads_llama_cpp_lines():
    text = ("llama_kv_cache:        CPU KV buffer size =   448.00 MiB\n"
            "llama_kv_cache:      CUDA0 KV buffer size =    64.00 MiB\n")
    assert host_kv_bytes(text) == [448 << 20]  # the GPU's cache is not in this process's RAM


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise: Linux")
def test_a_new_context_keeps_only_used_kv_pages_resident(text_path):
    if not madvise_frees_pages():
        pytest.skip("madvise(MADV_DONTNEED) is ignored here (QEMU user mode): no page can be handed back")
    with Model(text_path) as model:
        with capture() as cap:
            kept_before = rss_anon()
            kept = Context(model, ContextOptions(n_ctx=N_CTX, lazy_kv=False))
            kept_growth = rss_anon() - kept_before
        kv = sum(host_kv_bytes(cap.text))
        kept.close()
        before = rss_anon()
        lazy = Context(model, ContextOptions(n_ctx=N_CTX))
        growth = rss_anon() - before
        try:
            assert kv >= 8 << 20
            assert kept.kv_released_bytes == 0 and kept_growth >= kv
            assert lazy.kv_released_bytes >= 0.99 * kv
            assert growth <= kept_growth - 0.95 * kv
            ids = list(range(1, 65))
            used_before = rss_anon()
            lazy.decode(ids)  # 64 of 32768 cells: a few pages per layer come back
            assert rss_anon() - used_before < kv / 8
        finally:
            lazy.close()


@pytest.mark.parametrize("flash_attn", [FLASH_ATTN_ON, FLASH_ATTN_OFF])
def test_logits_are_bit_identical_to_a_cache_kept_resident(text_path, flash_attn):
    """The whole cache filled and cleared, then a prompt: the same bits as a context that never handed pages back."""
    n_ctx = 512
    results = []
    with Model(text_path) as model:
        for lazy in (True, False):
            with Context(model, ContextOptions(n_ctx=n_ctx, n_ubatch=64, flash_attn=flash_attn, lazy_kv=lazy)) as ctx:
                first = list(range(1, 40))
                ctx.decode(first, all_logits=True)
                a = ctx.all_logits(len(first))
                ctx.decode([(i * 7) % 200 + 1 for i in range(n_ctx - len(first))], pos0=len(first))  # every cell
                ctx.seq_rm(0, 0)
                ctx.decode(first, all_logits=True)
                b = ctx.all_logits(len(first))
                results.append((a, b))
    (lazy_a, lazy_b), (kept_a, kept_b) = results
    assert np.isfinite(lazy_a).all() and np.abs(lazy_a).max() > 0
    assert np.array_equal(lazy_a, kept_a) and np.array_equal(lazy_b, kept_b)
