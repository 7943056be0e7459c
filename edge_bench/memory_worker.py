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

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge_llama import (CPU_UBATCH, Context, ContextOptions, LoadOptions, Model, Projector, ProjectorOptions,
                        kv_type)

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
    from edge_llama import FLASH_ATTN_OFF, FLASH_ATTN_ON

    v = MemoryVariant(**(spec.variant or {"name": "default"}))
    m, res = spec.measure, spec.config.resolution
    kv = int(kv_type(spec.config.kv_type).ggml_type)
    flash = FLASH_ATTN_ON if m.flash_attn else FLASH_ATTN_OFF
    stage = lambda name: rec.value(f"rss_{name}", rss_now().get("VmRSS", 0))  # noqa: E731
    stage("start")
    with Model(spec.text_path, LoadOptions(m.n_gpu_layers, mmap=v.mmap, repack=v.repack and spec.config.repack(m),
                                                  amx=spec.config.amx)) as model:
        stage("model")
        with Context(model, ContextOptions(n_ctx=m.n_ctx, n_batch=m.n_batch, n_ubatch=min(v.n_ubatch, m.n_batch),
                                           n_threads=m.threads, type_k=kv, type_v=kv, flash_attn=flash)) as ctx:
            stage("context")
            with Projector(spec.mmproj_path, model, ProjectorOptions(
                    n_threads=m.threads, use_gpu=m.n_gpu_layers != 0, image_max_tokens=v.image_max_tokens,
                    flash_attn=flash, warmup=False)) as proj:
                stage("projector")
                t0 = time.perf_counter()
                n_past, n_image = _eval_image_prompt(proj, ctx, min(v.n_ubatch, m.n_batch),
                                                     np.asarray(bench_image(res.width, res.height)))
                rec.sample("image_prompt_s", time.perf_counter() - t0)  # encode + prefill: what a smaller ubatch costs
                stage("image")
                rec.value("image_tokens", n_image)
                rec.sample("decode_tok_s", _decode(model, ctx, n_past, DECODE_TOKENS))
                stage("decode")


def _eval_image_prompt(proj: Projector, ctx: Context, n_batch: int, rgb: np.ndarray) -> tuple[int, int]:
    from edge_llama import chunk_info

    with proj.tokenize(chat_prompt(FIRST_QUESTION, proj.marker), [rgb]) as chunks:
        n_image = sum(info.n_tokens for info in map(chunk_info, chunks) if info.kind == "image")
        return proj.eval_chunks(ctx, chunks, 0, 0, n_batch=n_batch), n_image


def _decode(model: Model, ctx: Context, n_past: int, n_tokens: int) -> float:
    from edge_llama import Batch, Sampler

    with Sampler(model).greedy() as sampler, Batch(1) as batch:
        t0 = None
        for i in range(n_tokens):
            token = sampler.sample(ctx, -1)
            if t0 is None:
                t0 = time.perf_counter()
            batch.fill((token,), n_past + i)
            ctx.decode_batch(batch)
        return n_tokens / (time.perf_counter() - t0)
