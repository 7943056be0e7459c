"""Measures our runtime, through VisionChat's public API only (what users call).

Per round: a first question about a new image (TTFT, encoder time, image
tokens, decode rate from the streamed pieces' times), a follow-up about the same image (TTFT with the KV
cache reused), then text-only prompts of each length (prefill rate). The
encoder cache is off so every round really encodes its image.
"""
from __future__ import annotations

import time

from .scenario import FIRST_QUESTION, FOLLOW_UP, FOLLOW_UP_TOKENS, bench_image, filler_text, png_bytes
from .summary import decode_rates
from .workers import Recorder, WorkerSpec


def open_chat(spec: WorkerSpec):
    from edge_runtime import VisionChat
    from edge_runtime.vision.image_budget import HIGH_MAX_TOKENS

    m = spec.measure
    return VisionChat(
        spec.text_path, spec.mmproj_path, n_ctx=m.n_ctx, n_batch=m.n_batch, n_ubatch=m.n_ubatch, mmap=m.mmap,
        repack=spec.config.repack(m), amx=spec.config.amx, kv_cache_type=spec.config.kv_type,
        flash_attn=m.flash_attn, n_gpu_layers="auto" if m.rpc_servers else m.n_gpu_layers, threads=m.threads,
        # llama.cpp's own default budget unless one is given: every party sees the image at equal tokens
        image_max_tokens=m.image_max_tokens or HIGH_MAX_TOKENS, encoder_cache_mb=0,
        rpc_servers=m.rpc_servers, tensor_split=m.tensor_split, n_cpu_moe=m.n_cpu_moe,
        override_tensor=m.override_tensor,
        tuned_dir=None,  # the parties run at the same, given settings: no tuned n_ubatch for one of them
    )


def measure(spec: WorkerSpec, rec: Recorder) -> None:
    m, res = spec.measure, spec.config.resolution
    png = png_bytes(bench_image(res.width, res.height))
    rec.time_loads(m, lambda: open_chat(spec))
    with open_chat(spec) as chat:
        for _ in rec.rounds(m):
            chat.reset()
            times = [time.perf_counter() for _ in chat.stream(FIRST_QUESTION, images=[png],
                                                              max_tokens=m.decode_tokens, temperature=0)]
            first = chat.last_stats
            rec.sample("ttft_first_s", first.ttft_s)
            rec.sample("image_encode_s", first.image_encode_s)
            rec.sample("prefill_image_prompt_tok_s", first.prefill_tok_s)
            rates = decode_rates(times)
            if rates:
                rec.sample("decode_tok_s", rates[0])
                rec.sample("decode_mean_tok_s", rates[1])
            elif first.generated_tokens >= 3 and first.decode_tok_s > 0:
                # random weights can emit tokens that stream no text (held-back partial UTF-8, empty
                # pieces): time the tokens themselves then, as the engine counted them
                rec.sample("decode_tok_s", first.decode_tok_s)
                rec.sample("decode_mean_tok_s", first.decode_tok_s)
                rec.note(f"decode rate from the engine's token count: the answer streamed {len(times)} text "
                         f"piece(s) for {first.generated_tokens} tokens")
            else:
                rec.note(f"no decode rate: the first answer had {first.generated_tokens} token(s) and streamed "
                         f"{len(times)} text piece(s); a rate needs 3 ({first.stop_reason})")
            if first.generated_tokens < m.decode_tokens:
                rec.note(f"the first answer ended after {first.generated_tokens} of {m.decode_tokens} tokens "
                         f"({first.stop_reason})")
            rec.value("image_tokens", first.image_tokens)
            rec.value("native_image_tokens", chat.engine.vision.native_tokens((res.width, res.height)))
            rec.value("prompt_tokens", first.prompt_tokens)
            rec.value("decode_tokens", first.generated_tokens)
            rec.value("kv_cache_bytes", first.kv_cache_bytes)

            chat.ask(FOLLOW_UP, max_tokens=FOLLOW_UP_TOKENS, temperature=0)
            follow = chat.last_stats
            rec.sample("ttft_followup_s", follow.ttft_s)
            rec.value("followup_reused_tokens", follow.reused_tokens)
            rec.value("followup_evaluated_tokens", follow.evaluated_tokens)

            for n in m.prompt_lengths:
                chat.reset()
                chat.ask(filler_text(n), max_tokens=1, temperature=0)
                rec.sample(f"prefill_tok_s@{n}", chat.last_stats.prefill_tok_s)
                rec.value(f"prefill_tokens@{n}", chat.last_stats.evaluated_tokens)
