"""Generated tokens -> the text a client sees, exactly as `VisionChat` shows it.

The same pieces in the same order: bytes of each token, whole UTF-8 characters
only, <think> reasoning cut, stop strings held back until they cannot match.
"""
from __future__ import annotations

from ..detokenize import PieceTable, StopMatcher, Utf8Stream
from ..template import ThinkFilter


class TextPipeline:
    def __init__(self, pieces: PieceTable, stops: tuple[str, ...], keep_think: bool, starts_inside_think: bool) -> None:
        self._pieces = pieces
        self._utf8 = Utf8Stream()
        self._think = None if keep_think else ThinkFilter(starts_inside=starts_inside_think)
        self._stops = StopMatcher(stops)

    @property
    def stopped(self) -> bool:
        """A stop string appeared: nothing more is shown, generation should end."""
        return self._stops.stopped

    def feed(self, token: int) -> str:
        text = self._utf8.feed(self._pieces(token))
        if self._think is not None:
            text = self._think.feed(text)
        out, _ = self._stops.feed(text)
        return out

    def finish(self) -> str:
        """Text held back at the end (a partial character, a partial stop string)."""
        if self._stops.stopped:
            return ""
        tail = self._utf8.flush()
        if self._think is not None:
            tail = self._think.feed(tail) + self._think.flush()
        tail, _ = self._stops.feed(tail)
        return tail + self._stops.flush()
