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
    x = row.astype(np.float64)
    peak = x.max()
    lse = peak + np.log(np.exp(x - peak).sum())
    best: tuple[tuple[bytes, float], ...] = ()
    if top > 0:
        k = min(top, x.size)
        ids = np.argpartition(-x, k - 1)[:k]
        ids = ids[np.lexsort((ids, -x[ids]))]
        best = tuple((piece(int(i)), _finite(x[i] - lse)) for i in ids)
    return TokenLogprob(piece(token), _finite(x[token] - lse), best)


def _finite(value: float) -> float:
    return max(float(value), FLOOR)

