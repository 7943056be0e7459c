"""Baseline (b): llama-cpp-python's own multimodal chat, `Llama` + `MTMDChatHandler`.

What a Python user gets without us. Its handler clears the KV cache and
re-encodes every image on every call, so a follow-up question about the same
image pays the whole first question again; that is the case this baseline is
for. Sampling is made greedy and penalty-free to match the runtime.
"""
from __future__ import annotations

import time
from typing import Any

from .scenario import FIRST_QUESTION, FOLLOW_UP, FOLLOW_UP_TOKENS, bench_image, data_uri, png_bytes
from .summary import decode_rates
from .workers import Recorder, WorkerSpec


# ggml-cpu/amx/common.h qtype_has_amx_kernels: weights of these types run llama.cpp's AMX tile kernels
# (F16 weights in the AMX buffer use AVX-512 only).
AMX_KERNEL_TYPES = {"Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"}


def refuse_faulting_amx(text_path: str) -> None:
    """llama-cpp-python's Llama always loads with every extra buffer type, AMX included: where edge_llama's
    probe found AMX faulting and the model has AMX-kernel weights, this baseline would die by SIGILL, so it
    reports why instead."""
    from gguf import GGUFReader

    from edge_llama import amx, bufts, resolve_amx

    if bufts.AMX not in {b.name for b in bufts.cpu_extra_buffer_types()}:
        return
    if not {t.tensor_type.name for t in GGUFReader(text_path).tensors} & AMX_KERNEL_TYPES:
        return
    plan = amx.extra_bufts_plan(True, resolve_amx("auto"))
    if not plan.use_extra_bufts:
        raise RuntimeError("llama-cpp-python's Llama cannot turn AMX off and AMX is not usable on this CPU "
                           f"({plan.how}); this baseline cannot run here")


def open_llama(spec: WorkerSpec):
    from edge_llama.baseline import open_chat_llama

    from edge_llama import kv_type

    refuse_faulting_amx(str(spec.text_path))
    m, kv = spec.measure, kv_type(spec.config.kv_type).ggml_type
    mmap, n_ubatch = m.load_settings(spec.config)  # its Llama cannot turn repacking off: --no-repack applies to the others
    return open_chat_llama(
        str(spec.text_path), str(spec.mmproj_path), use_gpu=m.n_gpu_layers != 0, n_ctx=m.n_ctx, n_batch=m.n_batch,
        n_ubatch=n_ubatch, use_mmap=mmap, n_threads=m.threads, n_threads_batch=m.threads, n_gpu_layers=m.n_gpu_layers,
        type_k=kv, type_v=kv, flash_attn=m.flash_attn, seed=0, verbose=False,
    )


def timed_chat(llm: Any, messages: list[dict], max_tokens: int) -> tuple[float, list[float], str]:
    """Stream one answer: (TTFT, the time of each text piece, text).

    The first stream chunk (the role) is sent together with the first token,
    so its arrival is the time to first token.
    """
    t0 = time.perf_counter()
    ttft, times, parts = None, [], []
    stream = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0, top_k=1,
                                        top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=0, stream=True)
    for chunk in stream:
        now = time.perf_counter()
        if ttft is None:
            ttft = now - t0
        content = chunk["choices"][0]["delta"].get("content")
        if content:
            times.append(now)
            parts.append(content)
    if ttft is None:
        raise RuntimeError("the chat handler streamed nothing")
    return ttft, times, "".join(parts)


def messages_for(uri: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": FIRST_QUESTION}]}]


def measure(spec: WorkerSpec, rec: Recorder) -> None:
    m, res = spec.measure, spec.config.resolution
    uri = data_uri(png_bytes(bench_image(res.width, res.height)))
    rec.time_loads(m, lambda: open_llama(spec))
    rec.note("load_s excludes the projector: MTMDChatHandler loads it on the first call")
    llm = open_llama(spec)
    try:
        # The handler loads its projector on its first call; make that happen before any timing,
        # as VisionChat loads its projector in its constructor.
        llm.create_chat_completion(messages=[{"role": "user", "content": "hi"}], max_tokens=1, temperature=0.0)
        for _ in rec.rounds(m):
            first = messages_for(uri)
            ttft, times, answer = timed_chat(llm, first, m.decode_tokens)
            rec.sample("ttft_first_s", ttft)
            rates = decode_rates(times)
            if rates:
                rec.sample("decode_tok_s", rates[0])
                rec.sample("decode_mean_tok_s", rates[1])
            rec.value("decode_tokens", len(times))
            follow = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": FOLLOW_UP}]
            ttft, _, _ = timed_chat(llm, follow, FOLLOW_UP_TOKENS)
            rec.sample("ttft_followup_s", ttft)
        rec.note("decode_tok_s counts streamed text pieces (one per token for plain text)")
    finally:
        llm.close()
