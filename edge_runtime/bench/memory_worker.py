"""Where the resident memory goes, and which load settings bring the peak down.

Loads the same files step by step with llama.cpp's low-level calls and
records RSS after each: text weights, context (KV cache + compute buffers),
projector, the first image (vision compute buffer + embeddings), decode. One
`MemoryVariant` per subprocess, so each peak is its own. The variants differ
in what the runtime could choose: mmap or a plain read of the weights (with
CPU weight repacking, an mmap'd file keeps the original pages resident next
to the repacked copy), repacking itself, the tokens per forward pass (text
compute buffer) and the image token budget (vision compute buffer).
"""
from __future__ import annotations

import ctypes
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..backend import CPU_UBATCH, ensure_backend, kv_type, model_params

from .scenario import FIRST_QUESTION, bench_image, chat_prompt
from .workers import Recorder, WorkerSpec

DECODE_TOKENS = 8


@dataclass(frozen=True)
class MemoryVariant:
    name: str
    mmap: bool = True
    repack: bool = True  # llama.cpp's CPU "extra buffer types": interleaved weights for faster matmuls
    n_ubatch: int = 512  # tokens per forward pass: sizes the text compute buffer
    image_max_tokens: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# From llama.cpp's defaults towards the smallest footprint, one change at a time.
DEFAULT_VARIANTS = (
    MemoryVariant("llama.cpp defaults (mmap, repack, n_ubatch 512)"),
    MemoryVariant("read, repack, n_ubatch 512", mmap=False),
    MemoryVariant(f"VisionChat on a CPU (read, repack, n_ubatch {CPU_UBATCH})", mmap=False, n_ubatch=CPU_UBATCH),
    MemoryVariant("mmap, no repack, n_ubatch 64", repack=False, n_ubatch=64),
    MemoryVariant("read, repack, n_ubatch 32", mmap=False, n_ubatch=32),
    MemoryVariant("read, repack, n_ubatch 64, image_max_tokens 256", mmap=False, n_ubatch=64, image_max_tokens=256),
)


def rss_now() -> dict[str, int]:
    """Current VmRSS and its anonymous / file-backed parts, in bytes (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def measure(spec: WorkerSpec, rec: Recorder) -> None:
    import llama_cpp as L
    from llama_cpp import mtmd_cpp as M

    v = MemoryVariant(**(spec.variant or {"name": "default"}))
    m, res = spec.measure, spec.config.resolution
    kv = kv_type(spec.config.kv_type).ggml_type
    flash = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if m.flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ensure_backend()
    stage = lambda name: rec.value(f"rss_{name}", rss_now().get("VmRSS", 0))  # noqa: E731
    stage("start")
    model = L.llama_model_load_from_file(str(spec.text_path).encode(), model_params(m.n_gpu_layers, mmap=v.mmap,
                                                                                    repack=v.repack))
    if not model:
        raise RuntimeError(f"could not load {spec.text_path}")
    stage("model")
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = m.n_ctx, m.n_batch, min(v.n_ubatch, m.n_batch)
    cp.n_threads = cp.n_threads_batch = m.threads
    cp.type_k, cp.type_v, cp.flash_attn_type, cp.no_perf = kv, kv, flash, True
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise RuntimeError("could not create a context")
    stage("context")
    pp = M.mtmd_context_params_default()
    pp.use_gpu, pp.n_threads, pp.warmup, pp.flash_attn_type, pp.print_timings = (
        m.n_gpu_layers != 0, m.threads, False, flash, False)
    if v.image_max_tokens:
        pp.image_max_tokens = v.image_max_tokens
    mctx = M.mtmd_init_from_file(str(spec.mmproj_path).encode(), model, pp)
    if not mctx:
        raise RuntimeError(f"could not load {spec.mmproj_path}")
    stage("projector")
    try:
        t0 = time.perf_counter()
        n_past, n_image = _eval_image_prompt(L, M, mctx, ctx, min(v.n_ubatch, m.n_batch), np.asarray(bench_image(res.width, res.height)))
        rec.sample("image_prompt_s", time.perf_counter() - t0)  # encode + prefill: what a smaller ubatch costs
        stage("image")
        rec.value("image_tokens", n_image)
        rec.sample("decode_tok_s", _decode(L, ctx, n_past, DECODE_TOKENS))
        stage("decode")
    finally:
        M.mtmd_free(mctx)
        L.llama_free(ctx)
        L.llama_model_free(model)


def _eval_image_prompt(L, M, mctx, ctx, n_batch: int, rgb: np.ndarray) -> tuple[int, int]:
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w = rgb.shape[:2]
    bmp = M.mtmd_bitmap_init(w, h, rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
    chunks = M.mtmd_input_chunks_init()
    try:
        text = chat_prompt(FIRST_QUESTION, M.mtmd_default_marker().decode()).encode()
        inp = M.mtmd_input_text(text, len(text), True, True)
        arr = (M.mtmd_bitmap_p_ctypes * 1)(bmp)
        if M.mtmd_tokenize(mctx, chunks, ctypes.byref(inp), arr, 1) != 0:
            raise RuntimeError("mtmd_tokenize failed")
        n_image = sum(M.mtmd_input_chunk_get_n_tokens(M.mtmd_input_chunks_get(chunks, i))
                      for i in range(M.mtmd_input_chunks_size(chunks))
                      if M.mtmd_input_chunk_get_type(M.mtmd_input_chunks_get(chunks, i)) != 0)
        new_past = L.llama_pos(0)
        if M.mtmd_helper_eval_chunks(mctx, ctx, chunks, 0, 0, n_batch, True, ctypes.byref(new_past)) != 0:
            raise RuntimeError("mtmd_helper_eval_chunks failed")
        return new_past.value, n_image
    finally:
        M.mtmd_input_chunks_free(chunks)
        M.mtmd_bitmap_free(bmp)


def _decode(L, ctx, n_past: int, n_tokens: int) -> float:
    sampler, batch = L.llama_sampler_init_greedy(), L.llama_batch_init(1, 0, 1)
    try:
        t0 = None
        for i in range(n_tokens):
            token = L.llama_sampler_sample(sampler, ctx, -1)
            if t0 is None:
                t0 = time.perf_counter()
            batch.n_tokens = 1
            batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.logits[0] = token, n_past + i, 1, 1
            batch.seq_id[0][0] = 0
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
        return n_tokens / (time.perf_counter() - t0)
    finally:
        L.llama_batch_free(batch)
        L.llama_sampler_free(sampler)
