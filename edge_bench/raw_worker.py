"""Baseline (a): the same work done with llama.cpp's low-level calls and nothing else.

No chat template, no bookkeeping, no detokenizing: a hand-written Qwen prompt,
mtmd to tokenize and encode, llama_decode, and a greedy sampler, each through
edge_llama's one-object wrappers (no runtime bookkeeping). It is the
ceiling for our runtime's overhead: VisionChat decode / this decode should be
close to 1. The follow-up evaluates only the new turn's tokens, which is the
least any runtime can do.
"""
from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image

from .scenario import (FIRST_QUESTION, FOLLOW_UP, FOLLOW_UP_TOKENS, bench_image, chat_prompt, filler_text,
                       follow_up_suffix, png_bytes)
from .summary import decode_rates
from .workers import Recorder, WorkerSpec


class RawSession:
    """A model, context, projector, greedy sampler and one reusable 1-token batch, opened with
    edge_llama's thin wrappers (one llama.cpp object each) and nothing of the runtime."""

    def __init__(self, spec: WorkerSpec):
        from edge_llama import (FLASH_ATTN_OFF, FLASH_ATTN_ON, Batch, Context, ContextOptions, LoadOptions, Model,
                                Projector, ProjectorOptions, Sampler, kv_type)

        m, kv = spec.measure, int(kv_type(spec.config.kv_type).ggml_type)
        flash = FLASH_ATTN_ON if m.flash_attn else FLASH_ATTN_OFF
        self.n_batch = m.n_batch
        mmap, n_ubatch = m.load_settings(spec.config)
        self.model = Model(spec.text_path, LoadOptions(m.n_gpu_layers, mmap=mmap, repack=spec.config.repack(m),
                                                       amx=spec.config.amx))
        self.ctx = Context(self.model, ContextOptions(n_ctx=m.n_ctx, n_batch=m.n_batch, n_ubatch=n_ubatch,
                                                      n_threads=m.threads, type_k=kv, type_v=kv, flash_attn=flash))
        self.proj = Projector(spec.mmproj_path, self.model, ProjectorOptions(
            n_threads=m.threads, use_gpu=m.n_gpu_layers != 0, image_max_tokens=m.image_max_tokens,
            flash_attn=flash, warmup=False))
        self.sampler = Sampler(self.model).greedy()
        self.batch = Batch(1)

    def close(self) -> None:
        for obj in (self.batch, self.sampler, self.proj, self.ctx, self.model):
            obj.close()

    def prefill_chunks(self, text: str, rgb: np.ndarray) -> tuple[int, float, int]:
        """Evaluate a prompt with one image chunk by chunk; (n_past, encode seconds, image tokens)."""
        from edge_llama import chunk_is_text, chunk_text_tokens

        chunks = self.proj.tokenize(text, [rgb])
        n_past, encode_s, image_tokens = 0, 0.0, 0
        try:
            for chunk in chunks:
                if chunk_is_text(chunk):
                    tokens = chunk_text_tokens(chunk)
                    self.ctx.decode(tokens, n_past)  # logits for its last token (used when it ends the prompt)
                    n_past += len(tokens)
                    continue
                t0 = time.perf_counter()
                embd = self.proj.encode(chunk, copy=False)
                encode_s += time.perf_counter() - t0
                image_tokens += len(embd)
                n_past = self.proj.decode_image(self.ctx, chunk, embd, n_past, 0, self.n_batch)
        finally:
            chunks.close()
        return n_past, encode_s, image_tokens

    def generate(self, n_past: int, n_tokens: int) -> tuple[list[int], list[float], int]:
        """Greedy-sample n_tokens (EOG included: a decode rate needs a fixed count).

        Like VisionChat, the last sampled token is not evaluated. Returns the
        tokens, the time each was sampled, and n_past after them.
        """
        tokens, times = [], []
        while True:
            token = self.sampler.sample(self.ctx, -1)
            times.append(time.perf_counter())
            tokens.append(token)
            if len(tokens) >= n_tokens:
                return tokens, times, n_past
            self.batch.fill((token,), n_past)
            self.ctx.decode_batch(self.batch)
            n_past += 1


def rgb_from_png(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as img:
        return np.ascontiguousarray(np.asarray(img.convert("RGB")))


def measure(spec: WorkerSpec, rec: Recorder) -> None:
    m, res = spec.measure, spec.config.resolution
    png = png_bytes(bench_image(res.width, res.height))
    rec.time_loads(m, lambda: RawSession(spec))
    s = RawSession(spec)
    try:
        for _ in rec.rounds(m):
            s.ctx.clear()
            t0 = time.perf_counter()
            n_past, encode_s, image_tokens = s.prefill_chunks(chat_prompt(FIRST_QUESTION, s.proj.marker),
                                                               rgb_from_png(png))
            prompt_tokens = n_past
            t_prefilled = time.perf_counter()
            tokens, times, n_past = s.generate(n_past, m.decode_tokens)
            rec.sample("ttft_first_s", times[0] - t0)
            rec.sample("image_encode_s", encode_s)
            rec.value("image_tokens", image_tokens)
            rec.value("prompt_positions", prompt_tokens)  # M-RoPE: an image takes fewer positions than tokens
            rec.value("decode_tokens", len(tokens))
            rates = decode_rates(times)
            if rates:
                rec.sample("decode_tok_s", rates[0])
                rec.sample("decode_mean_tok_s", rates[1])
            rec.value("prefill_with_encode_s", t_prefilled - t0)

            t0 = time.perf_counter()
            turn = [tokens[-1]] + s.model.tokenize(follow_up_suffix(FOLLOW_UP))
            s.ctx.decode(turn, n_past)
            _, follow_times, _ = s.generate(n_past + len(turn), FOLLOW_UP_TOKENS)
            rec.sample("ttft_followup_s", follow_times[0] - t0)
            rec.value("followup_evaluated_tokens", len(turn))

            for n in m.prompt_lengths:
                s.ctx.clear()
                prompt = s.model.tokenize(chat_prompt(filler_text(n)))
                t0 = time.perf_counter()
                s.ctx.decode(prompt, 0)
                rec.sample(f"prefill_tok_s@{n}", len(prompt) / (time.perf_counter() - t0))
                rec.value(f"prefill_tokens@{n}", len(prompt))
    finally:
        s.close()
