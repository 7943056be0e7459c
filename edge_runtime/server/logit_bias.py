"""OpenAI's `logit_bias` and llama-server's `ignore_eos` as a token -> logit offset table.

The sampler chains come from `GenerationOptions`, which has no bias; the core (`Engine.add_bias`)
adds the table to the logits before the chain reads them, the same computation
llama.cpp's logit-bias sampler does, leaving unbiased requests untouched.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from .errors import bad_request

BAN = -math.inf


def build_bias(requested: Mapping[int, float], n_vocab: int, ignore_eos: bool, eog_tokens: Iterable[int]) -> dict[int, float]:
    """Token id -> value added to its logit; a 400 names ids outside the vocabulary."""
    bad = sorted(t for t in requested if not 0 <= t < n_vocab)
    if bad:
        raise bad_request(f"logit_bias names token id(s) {bad[:5]} outside this model's vocabulary "
                          f"(0..{n_vocab - 1})", "logit_bias")
    bias = dict(requested)
    if ignore_eos:
        bias.update({t: BAN for t in eog_tokens})
    return bias


def end_of_generation_tokens(engine: Any) -> list[int]:
    """Every token that ends an answer (EOG flags plus the template's end-of-turn)."""
    n_vocab = engine.text_model.n_vocab
    return [t for t in range(n_vocab) if engine.is_end_of_turn(t)]
