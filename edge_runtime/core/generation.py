"""What one sampled token does to an answer, decided once for every generation loop.

VisionChat's loop (sample, evaluate one token) and the server's (one batched
llama_decode for all slots) differ in how tokens are sampled and evaluated;
what a token means does not: an end-of-turn token ends the answer unshown, the
others go through the detokenizer (whole characters, <think> cut, stop strings
held back) and count against the token limit. As mlx-lm's `stream_generate`
sits over `generate_step` for both its CLI and its server.
"""
from __future__ import annotations

from enum import StrEnum
from typing import Callable

from edge_runtime.core.detokenize import PieceTable, TextPipeline
from edge_runtime.core.options import GenerationOptions


class StopReason(StrEnum):
    """Why an answer ended; the values are what `GenerationStats.stop_reason` has always shown."""

    END_OF_TURN = "eog"  # an end-of-turn token (not shown, not counted)
    STOP = "stop"  # a stop string
    LENGTH = "length"  # max_tokens, or the context is full
    CANCELLED = "cancelled"  # the caller stopped reading

    @property
    def finish_reason(self) -> str:
        """OpenAI's finish_reason: an end-of-turn token and a stop string both finish with "stop"."""
        return "length" if self is StopReason.LENGTH else "stop"


END_OF_TURN, STOP, LENGTH = StopReason.END_OF_TURN, StopReason.STOP, StopReason.LENGTH


class AnswerStep:
    """The per-token step of one answer: `accept` each sampled token, show what it returns,
    and stop evaluating once `reason` is set; `finish` gives the text held back at the end.

    A Thinking model's reasoning is not shown: `take_reasoning` gives it apart. Once it has
    used `max_thinking_tokens`, the close tag is forced (`forced_token` hands its tokens to the
    sampler one by one, as llama.cpp's reasoning-budget sampler does) so the answer starts; the
    reasoning and the forced tokens count toward `limit`, as they do toward llama-server's n_predict.
    """

    def __init__(self, pieces: PieceTable, options: GenerationOptions, limit: int, starts_inside_think: bool,
                 is_end_of_turn: Callable[[int], bool]) -> None:
        self.limit = limit
        self.pieces = pieces  # token -> bytes, also for the logprobs of the answer's tokens
        self.generated = 0  # tokens of the answer (end-of-turn not counted), reasoning included
        self.thinking_tokens = 0  # of those, the reasoning's (a forced close tag included)
        self.reason: StopReason | None = None
        self._is_end_of_turn = is_end_of_turn
        self._text = TextPipeline(pieces, options.stop, options.keep_think, starts_inside_think)
        self._budget = options.max_thinking_tokens
        self._forced: list[int] = []
        self._force_if_spent()

    @property
    def thinking(self) -> bool:
        """The model is reasoning (inside <think>): a grammar waits for the answer."""
        return self._text.thinking

    def take_reasoning(self) -> str:
        """The reasoning produced since the last call (not part of what `accept` returns)."""
        return self._text.take_reasoning()

    @property
    def forcing(self) -> bool:
        """A forced close tag's tokens are pending (`forced_token` gives them, one per call)."""
        return bool(self._forced)

    def forced_token(self) -> int | None:
        """The next token of a forced close tag (the thinking budget is spent), instead of sampling."""
        return self._forced.pop(0) if self._forced else None

    def _force_if_spent(self) -> None:
        if self._budget is not None and self.thinking and not self._forced and self.thinking_tokens >= self._budget:
            self._forced = list(self.pieces.think_close)

    def accept(self, token: int) -> str:
        """The text `token` adds to the answer; sets `reason` when the answer ends with it."""
        if self.reason is not None:
            raise RuntimeError(f"the answer already ended ({self.reason})")
        if self._is_end_of_turn(token):
            self.reason = END_OF_TURN
            return ""
        self.generated += 1
        if self.thinking:
            self.thinking_tokens += 1
        text = self._text.feed(token)
        self._force_if_spent()
        if self._text.stopped:
            self.reason = STOP
        elif self.generated >= self.limit:
            self.reason = LENGTH
        return text

    def finish(self) -> str:
        """Text held back at the end (a partial character or stop string); "" after a stop string."""
        return self._text.finish()
