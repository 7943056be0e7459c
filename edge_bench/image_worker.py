"""One image-scenario case of `edge-bench --images`, in a fresh process (its own peak RSS).

Reads a JSON case on stdin, prints one JSON object on stdout (llama.cpp's own
output goes to stderr). Cases: "ask" (first question about an image, `repeats`
times, re-encoding each time unless a disk cache serves it), "attach" (attach,
wait as a user typing would, then ask), "profile" (one encode per stage and
operation) and "transformers" (the bf16 reference on the same image at the same
image tokens).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

from .scenario import FIRST_QUESTION

ANSWER_TOKENS = 2  # TTFT is what is measured; two tokens prove generation started


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def run_ask(case: dict) -> dict:
    from edge_runtime import VisionChat
    from edge_common.peak_rss import peak_rss_bytes

    t0 = time.perf_counter()
    chat = VisionChat(case["text"], case["mmproj"], encoder_cache_mb=0, **case.get("chat", {}))
    load_s = time.perf_counter() - t0
    rates_at_load = chat.engine.cost.source  # "calibration" in a fresh cost dir: measured at load
    rows = []
    with chat:
        for _ in range(case.get("repeats", 1)):
            chat.reset()
            if case["mode"] == "attach":
                thread = chat.attach([case["image"]])
                thread.join()  # the user is still typing
            images = None if case["mode"] == "attach" else [case["image"]]
            chat.ask(FIRST_QUESTION, images=images, max_tokens=ANSWER_TOKENS, temperature=0)
            s = chat.last_stats
            rows.append(s)
        eng = chat.engine
        last = rows[-1]
        t0 = time.perf_counter()
        eng.calibrate()  # what the fresh process paid at load (the rates stay as measured)
        calibration_s = time.perf_counter() - t0
        source = last.image_details[0].get("source_size") if last.image_details else None
        encoded = [r for r in rows if r.images_encoded]
        enc_flops = eng.vision.encoder_flops(last.image_tokens)
        prefill_rates = [r.evaluated_tokens * eng.text_flops_per_token / r.prefill_s for r in rows if r.prefill_s]
        enc_rates = [enc_flops / r.image_encode_s for r in encoded if r.image_encode_s]
        return {
            "load_s": load_s,
            "ttft_s": _median([r.ttft_s for r in rows]),
            "ttft_all_s": [r.ttft_s for r in rows],
            "image_encode_s": _median([r.image_encode_s for r in rows]),
            "prefill_s": _median([r.prefill_s for r in rows]),
            "image_tokens": last.image_tokens,
            "image_tokens_all": [r.image_tokens for r in rows],
            "native_tokens": eng.vision.native_tokens(tuple(source)) if source else None,
            "rates_at_load": rates_at_load,
            "calibration_s": calibration_s,
            "prompt_tokens": last.prompt_tokens,
            "evaluated_tokens": last.evaluated_tokens,
            "images_encoded": sum(r.images_encoded for r in rows),
            "disk_cache_hits": sum(r.disk_cache_hits for r in rows),
            "image": last.image_details[0] if last.image_details else None,
            "encoder_gflop_s": _median(enc_rates) / 1e9,
            "prefill_gflop_s": _median(prefill_rates) / 1e9,
            "peak_rss_bytes": peak_rss_bytes(),
            "mmproj": case["mmproj"],
        }


def run_profile(case: dict) -> dict:
    """One encode of the image per stage and operation; the embeddings saved for the cosine comparison."""
    from dataclasses import asdict

    import numpy as np

    from edge_runtime import VisionChat
    from edge_common.peak_rss import peak_rss_bytes

    from .encoder_profile import profile_encode

    with VisionChat(case["text"], case["mmproj"], encoder_cache_mb=0, **case.get("chat", {})) as chat:
        prof = profile_encode(chat, case["image"], keep_embeddings=True)
    np.save(case["embeddings"], prof.embeddings)
    return {"tokens": prof.tokens, "preprocess_s": prof.preprocess_s, "encode_s": prof.encode_s,
            "profiled_s": prof.profiled_s, "rows": [asdict(r) for r in prof.rows], "embeddings": case["embeddings"],
            "mmproj": case["mmproj"], "peak_rss_bytes": peak_rss_bytes()}


def run_transformers(case: dict) -> dict:
    import torch
    from PIL import Image

    from edge_common.peak_rss import peak_rss_bytes
    from edge_models import family_for_checkpoint

    from .transformers_worker import _pad_token_id, generate_inputs

    reference = family_for_checkpoint(case["hf_dir"]).module("reference")  # imported before the clock starts
    torch.set_num_threads(case["threads"])
    t0 = time.perf_counter()
    ref = reference.Reference.load(case["hf_dir"], dtype="bfloat16")
    load_s = time.perf_counter() - t0
    pad = _pad_token_id(ref)
    ttfts, n_image = [], 0
    for _ in range(case.get("repeats", 1)):
        t0 = time.perf_counter()  # the processor's resize is part of the first token's wait, as ours is
        inputs, n_image = generate_inputs(ref, Image.open(case["image"]).convert("RGB"))
        with torch.inference_mode():
            ref.model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=pad)
        ttfts.append(time.perf_counter() - t0)
    return {"load_s": load_s, "ttft_s": _median(ttfts), "ttft_all_s": ttfts, "image_tokens": n_image,
            "peak_rss_bytes": peak_rss_bytes()}


def main() -> None:
    case = json.loads(sys.stdin.read())
    out = os.dup(1)
    os.dup2(2, 1)  # llama.cpp / torch chatter goes to stderr; the result alone to the real stdout
    try:
        run = {"transformers": run_transformers, "profile": run_profile}.get(case["mode"], run_ask)
        result = run(case)
    finally:
        sys.stdout.flush()
        os.dup2(out, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
