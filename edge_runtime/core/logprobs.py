"""Token log-probabilities (OpenAI's `logprobs` / `top_logprobs`), read from the row the sampler reads.

The distribution is the model's: one log-softmax of the logits row after the
request's logit bias (which is part of what was asked, as OpenAI's logprobs
show a biased token's new probability), before the sampler chain: temperature,
top-k/top-p/min-p, penalties and grammar do not change it. OpenAI reports the
model's probabilities whatever the temperature, and a grammar or a forced tool
call that picks an unlikely token should show that it was unlikely, not 0.
Computed only for answers that ask (numpy, one pass over the vocabulary); the
others pay nothing per token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

FLOOR = -9999.0  # OpenAI's logprob for "never" (-inf cannot be written in JSON)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its bytes, its log-probability, and the `top` most likely alternatives."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


def token_logprob(row: np.ndarray, token: int, top: int, piece: Callable[[int], bytes]) -> TokenLogprob:
    """The log-softmax of `row` at `token`, and the `top` highest entries (ties: lower token id first)."""
    peak = float(row.max())
    lse = peak + float(np.log(np.exp(row - peak).sum(dtype=np.float64)))  # float32 exp, float64 sum
    best: tuple[tuple[bytes, float], ...] = ()
    if top > 0:
        k = min(top, row.size)
        ids = np.argpartition(row, row.size - k)[row.size - k:]
        ids = ids[np.lexsort((ids, -row[ids]))]
        best = tuple((piece(int(i)), _finite(float(row[i]) - lse)) for i in ids)
    return TokenLogprob(piece(token), _finite(float(row[token]) - lse), best)


def _finite(value: float) -> float:
    return max(float(value), FLOOR)

