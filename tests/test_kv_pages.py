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
import os
import sys

import numpy as np
import pytest

from edge_llama import Context, ContextOptions, Model
from edge_llama.backend import capture
from edge_llama.kv_pages import (MADV_DONTNEED, PAGE, host_kv_bytes, libc, new_spans, open_own_memory, runs,
                                  zero_pages)
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
        pytest.skip("madvise(MADV_DONTNEED) is ignored here (an emulator that does not pass it on): "
                    "no page can be handed back")
    with Model(text_path) as model:
        with capture() as cap:
            kept_before = rss_anon()
            kept = Context(model, ContextOptions(n_ctx=N_CTX, lazy_kv=False))
            kept_growth = rss_anon() - kept_before
        kv = sum(host_kv_bytes(cap.text))
        ids = list(range(1, 65))
        kept.decode(ids)  # the decode path warm (an emulator's translated code counts in RssAnon too)
        kept.close()
        before = rss_anon()
        lazy = Context(model, ContextOptions(n_ctx=N_CTX))
        growth = rss_anon() - before
        try:
            assert kv >= 8 << 20
            assert kept.kv_released_bytes == 0 and kept_growth >= kv
            assert lazy.kv_released_bytes >= 0.99 * kv
            assert growth <= kept_growth - 0.95 * kv
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


def test_new_spans_cut_out_what_was_mapped_before():
    """The kernel merges a new mapping with an old neighbour into one line: only the new part is ours."""
    assert new_spans([(10, 20)], [(10, 30), (40, 50)]) == [(20, 30), (40, 50)]
    assert new_spans([(10, 20), (25, 28)], [(5, 30)]) == [(5, 10), (20, 25), (28, 30)]
    assert new_spans([(0, 100)], [(0, 100)]) == []
    assert new_spans([], [(1, 2)]) == [(1, 2)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/mem: Linux")
def test_pages_read_through_proc_self_mem_and_an_unmapped_span_is_no_crash():
    """Zero pages are found as numpy sees them; a span unmapped since /proc/self/maps was read is a
    failed read (no page of it counts as zero), not the segmentation fault a pointer read would be."""
    fd = open_own_memory()
    if fd is None:
        pytest.skip("/proc/self/mem does not read this process's own addresses here (an emulator's host memory)")
    try:
        n = 8
        buf = mmap.mmap(-1, n * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for page in (1, 4, 5):
            buf[page * PAGE + 123] = 7
        view = ctypes.c_char.from_buffer(buf)
        addr = ctypes.addressof(view)
        expected = ~np.frombuffer(buf, np.uint8).reshape(n, PAGE).any(axis=1)
        scratch = np.empty(3 * PAGE // 8, np.uint64)  # blocks smaller than the span: the block loop is used
        assert zero_pages(fd, addr, n, scratch).tolist() == expected.tolist()
        del view
        buf.close()  # munmap: the same addresses are gone now
        assert not zero_pages(fd, addr, n, scratch).any()
    finally:
        os.close(fd)
