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

from dataclasses import dataclass, field
from typing import Sequence

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


class Core(Closeable):
    """Steps answers over one engine; owns the token batch (one token per answer plus a prompt run)."""

    def __init__(self, engine: Engine, capacity: int) -> None:
        self.engine = engine
        self.batch = Batch(capacity)

    def start(self, answer: Answer, index: int = -1, biased: bool = False) -> str:
        """The prompt is evaluated: sample the first token from batch output `index`; the text it shows.
        `biased`: another answer sampled this row already (its bias, the same, is in the row)."""
        return self._sample(answer, index, biased)

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
        self.engine.eval_tokens(self.batch, entries)
        return [self._sample(a, i) for i, a in enumerate(answers)]

    def _sample(self, answer: Answer, index: int, biased: bool = False) -> str:
        """Sample `answer`'s next token from batch output `index`; accept it (and its logprob, if asked)."""
        token = self.engine.sample(answer.sampler, index, None if biased else answer.bias)
        text = answer.step.accept(token)
        if answer.step.reason is not StopReason.END_OF_TURN:
            answer.tokens.append(token)
            if answer.top_logprobs is not None:
                answer.logprobs.append(token_logprob(self.engine.logits_row(index), token, answer.top_logprobs,
                                                     answer.step.pieces))
        answer.pending = token if answer.step.reason is None else None
        answer.stats.generated_tokens = answer.step.generated
        if answer.step.reason is not None:
            answer.stats.stop_reason = answer.step.reason
        return text

    def close(self) -> None:
        self.batch.close()
