"""Expected logprobs from an independent source: a separate llama.cpp decode of the same GGUF.

No server, no sampler, no runtime: edge_llama's raw `Context.decode` and a numpy log-softmax,
the prompt rendered by jinja2 from the fixture's template the way transformers renders it.
"""
from __future__ import annotations

import platform
from pathlib import Path

import jinja2
import numpy as np
import pytest

from edge_common.manifest import resolve_model_paths
from edge_llama import Context, ContextOptions, Model
from edge_models.qwen3vl.synthetic import CHAT_TEMPLATE


def reference_logprobs(model_dir: Path, messages: list[dict], n: int, top: int,
                       bias: dict[int, float] | None = None) -> list[dict]:
    """A greedy walk of `n` tokens by a separate llama.cpp context (edge_llama's raw decode, no
    server, no sampler): each token's OpenAI logprob entry from a numpy log-softmax of its logits
    row (plus `bias`), the prompt rendered by jinja2 as transformers does from the fixture's template."""
    text = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(CHAT_TEMPLATE).render(
        messages=messages, add_generation_prompt=True)
    model = Model(resolve_model_paths(model_dir, None)[0])
    ctx = Context(model, ContextOptions(n_ctx=1024, n_threads=1))
    try:
        tokens = model.tokenize(text)
        ctx.decode(tokens)
        out = []
        for _ in range(n):
            row = ctx.logits(-1).astype(np.float64)
            for token, value in (bias or {}).items():
                row[token] += value
            lsm = row - row.max() - np.log(np.exp(row - row.max()).sum())
            order = sorted(range(row.size), key=lambda i: (-row[i], i))
            best = order[0]
            if model.is_eog(best):
                break

            def entry(i: int) -> dict:
                piece = model.piece(i)
                return {"token": piece.decode("utf-8", errors="replace"), "logprob": lsm[i], "bytes": list(piece),
                        "id": i}  # the id: not OpenAI's, for a test's logit_bias
            out.append({**entry(best), "top_logprobs": [entry(i) for i in order[:top]]})
            ctx.decode([best], pos0=len(tokens))
            tokens.append(best)
        return out
    finally:
        ctx.close()
        model.close()


# How far two llama.cpp contexts on the same f16 GGUF may part. x86's f16 kernels accumulate in f32:
# the server (2 threads, its own ubatch, cached prefix cells) and the reference (1 thread, one pass)
# agree to 2e-3. ARM cores with fp16 vector arithmetic (every ARMv8.2+ core: Pi 5, Orin, M chips)
# accumulate in f16, and a different split of the same product moved values by up to ~3e-3 in the
# arm64 lane; 1e-2 is the lane's parity bound for logits.
F16_SUMS_IN_F16 = platform.machine().lower() in ("aarch64", "arm64")
LOGPROB_TOL = 1e-2 if F16_SUMS_IN_F16 else 2e-3


def assert_logprobs_match(got: list[dict], want: list[dict]) -> None:
    """OpenAI `logprobs.content` entries equal the reference's: tokens, bytes, values to LOGPROB_TOL."""
    assert [g["bytes"] for g in got] == [w["bytes"] for w in want]  # the same greedy tokens
    for g, w in zip(got, want):
        assert g["token"] == w["token"]
        assert g["logprob"] == pytest.approx(w["logprob"], abs=LOGPROB_TOL)
        assert [t["bytes"] for t in g["top_logprobs"]] == [t["bytes"] for t in w["top_logprobs"]]
        assert [t["logprob"] for t in g["top_logprobs"]] == pytest.approx(
            [t["logprob"] for t in w["top_logprobs"]], abs=LOGPROB_TOL)
