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
    and stop evaluating once `reason` is set; `finish` gives the text held back at the end."""

    def __init__(self, pieces: PieceTable, options: GenerationOptions, limit: int, starts_inside_think: bool,
                 is_end_of_turn: Callable[[int], bool]) -> None:
        self.limit = limit
        self.pieces = pieces  # token -> bytes, also for the logprobs of the answer's tokens
        self.generated = 0  # tokens of the answer (end-of-turn not counted)
        self.reason: StopReason | None = None
        self._is_end_of_turn = is_end_of_turn
        self._text = TextPipeline(pieces, options.stop, options.keep_think, starts_inside_think)

    def accept(self, token: int) -> str:
        """The text `token` adds to the answer; sets `reason` when the answer ends with it."""
        if self.reason is not None:
            raise RuntimeError(f"the answer already ended ({self.reason})")
        if self._is_end_of_turn(token):
            self.reason = END_OF_TURN
            return ""
        self.generated += 1
        text = self._text.feed(token)
        if self._text.stopped:
            self.reason = STOP
        elif self.generated >= self.limit:
            self.reason = LENGTH
        return text

    def finish(self) -> str:
        """Text held back at the end (a partial character or stop string); "" after a stop string."""
        return self._text.finish()
