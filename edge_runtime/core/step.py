"""The batched core: one step for every sequence answering at once, VisionChat's one and the server's many.

A step is one llama_decode holding the pending token (sampled, shown, not yet
evaluated) of every answering sequence, plus, on the server, a run of prompt
tokens of a sequence being filled (llama-server mixes prompt tokens into its
decode batch the same way). Then each answering sequence samples its next
token from its row of logits and its `AnswerStep` says what the token means:
end of turn, a stop string, the token limit are checked there, once. As vLLM's
`EngineCore.step` and llama-server's slot loop: the server's scheduler calls
`step` with many answers, `VisionChat` with one, and both read the answer's
numbers from the same `GenerationStats`.

The engine keeps each sequence's bookkeeping (`Engine.eval_tokens`,
`eval_image_piece`): a token is recorded once evaluated, and a failed step
leaves no half-written cells. Prompts are walked in pieces by a
`prompt.PromptCursor`: `Engine.prefill` takes them one after the other for
VisionChat, the server one per step beside the answers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from edge_llama import Batch, Closeable, Sampler

from edge_runtime.core.engine import Engine
from edge_runtime.core.generation import AnswerStep, StopReason
from edge_runtime.core.logprobs import TokenLogprob, token_logprob
from edge_runtime.core.stats import GenerationStats


@dataclass
class Answer:
    """One sequence answering: its sampler, its per-token step, its numbers."""

    seq_id: int
    sampler: Sampler
    step: AnswerStep
    stats: GenerationStats = field(default_factory=GenerationStats)
    bias: dict[int, float] | None = None  # added to the logits before each sample (logit_bias, ignore_eos)
    pending: int | None = None  # sampled and shown, evaluated by the next step
    tokens: list[int] = field(default_factory=list)  # the answer's token ids (end of turn not included)
    top_logprobs: int | None = None  # None: no logprobs asked; N: each token's logprob and the N likeliest
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per entry of `tokens`, when asked
    _logprobs_sent: int = 0

    def unsent_logprobs(self) -> tuple[TokenLogprob, ...]:
        """The logprobs of the tokens since the last call (the server sends them with the text they made)."""
        out = tuple(self.logprobs[self._logprobs_sent:])
        self._logprobs_sent = len(self.logprobs)
        return out

    @property
    def done(self) -> bool:
        return self.step.reason is not None

    def cancel(self) -> None:
        """The caller stopped reading: the answer ends here (the pending token is never evaluated)."""
        if self.step.reason is None:
            self.stats.stop_reason = StopReason.CANCELLED
        self.pending = None

    def close(self) -> None:
        self.sampler.close()


STEP_PARTS = ("decode", "sample", "logits", "detokenize", "messages", "bookkeeping")


class StepProfile:
    """Seconds spent in each part of the steps (`STEP_PARTS`) since the last `take`.

    A step's cost outside llama_decode is what decides whether batching pays on a
    small CPU, so the core times its parts (perf_counter around each, well under a
    microsecond a part) and the server adds what it does around the step: the
    messages to the HTTP side and its own bookkeeping.
    """

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STEP_PARTS, 0.0)

    def add(self, part: str, seconds: float) -> None:
        self.seconds[part] += seconds

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, dict.fromkeys(STEP_PARTS, 0.0)
        return out


class Core(Closeable):
    """Steps answers over one engine; owns the token batch (one token per answer plus a prompt run)."""

    def __init__(self, engine: Engine, capacity: int) -> None:
        self.engine = engine
        self.batch = Batch(capacity)
        self.profile = StepProfile()

    def start(self, answer: Answer, index: int = -1, biased: bool = False) -> str:
        """The prompt is evaluated: sample the first token from batch output `index`; the text it shows.
        `biased`: another answer sampled this row already (its bias, the same, is in the row)."""
        clock = time.perf_counter
        t0 = clock()
        if answer.bias and not biased:
            self.engine.add_bias(index, answer.bias)
        t1 = clock()
        if _is_argmax(answer.sampler):
            token = int(np.argmax(self.engine.logits_row(index)))
        else:
            token = self.engine.sample(answer.sampler, index)
        self.profile.add("logits", t1 - t0)
        self.profile.add("sample", clock() - t1)
        return self._accept(answer, token, index)

    def step(self, answers: Sequence[Answer], prompt_seq: int = -1, prompt_tokens: Sequence[int] = (),
             prompt_logits: bool = False) -> list[str]:
        """One llama_decode: the pending token of each of `answers`, then `prompt_tokens` of sequence
        `prompt_seq` (its last token's logits when `prompt_logits`); then each answer samples its next
        token. Returns the text each answer adds. A failed decode raises with the bookkeeping of every
        touched sequence as it was before the step."""
        entries = [(a.seq_id, a.pending, True) for a in answers]
        entries += [(prompt_seq, t, prompt_logits and j == len(prompt_tokens) - 1) for j, t in enumerate(prompt_tokens)]
        if not entries:
            return []
        decoding = self.engine.decode_seconds
        self.engine.eval_tokens(self.batch, entries)
        self.profile.add("decode", self.engine.decode_seconds - decoding)
        if not answers:
            return []
        clock = time.perf_counter
        t0 = clock()
        for i, answer in enumerate(answers):
            if answer.bias:
                self.engine.add_bias(i, answer.bias)
        t1 = clock()
        tokens = self._pick(answers)
        self.profile.add("logits", t1 - t0)
        self.profile.add("sample", clock() - t1)
        return [self._accept(a, token, i) for i, (a, token) in enumerate(zip(answers, tokens))]

    def _pick(self, answers: Sequence[Answer]) -> list[int]:
        """The next token of each answer from batch outputs 0..n-1 (as their logits stand, bias added).
        Greedy answers take the argmax of their row, computed for the whole block in one numpy call
        (the first highest logit, as llama.cpp's greedy sampler picks it, without its per-row walk that
        copies the vocabulary into candidates); the others run their sampler chain on their row."""
        argmax = [_is_argmax(a.sampler) for a in answers]
        best = self.engine.logits_block(len(answers)).argmax(axis=1) if any(argmax) else None
        return [int(best[i]) if greedy and best is not None else self.engine.sample(a.sampler, i)
                for i, (a, greedy) in enumerate(zip(answers, argmax))]

    def _accept(self, answer: Answer, token: int, index: int) -> str:
        """`token` is `answer`'s next (sampled from batch output `index`): the text it shows; its logprob
        when asked."""
        clock = time.perf_counter
        t0 = clock()
        text = answer.step.accept(token)
        t1 = clock()
        self.profile.add("detokenize", t1 - t0)
        if answer.step.reason is not StopReason.END_OF_TURN:
            answer.tokens.append(token)
            if answer.top_logprobs is not None:
                answer.logprobs.append(token_logprob(self.engine.logits_row(index), token, answer.top_logprobs,
                                                     answer.step.pieces))
                self.profile.add("logits", clock() - t1)
        answer.pending = token if answer.step.reason is None else None
        answer.stats.generated_tokens = answer.step.generated
        if answer.step.reason is not None:
            answer.stats.stop_reason = answer.step.reason
        return text

    def close(self) -> None:
        self.batch.close()


def _is_argmax(sampler: Any) -> bool:
    """The sampler is greedy alone (`Sampler.is_argmax`); one that does not say (a wrapper choosing among
    chains, forcing tokens) samples for itself."""
    return bool(getattr(sampler, "is_argmax", False))
