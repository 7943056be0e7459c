"""Streaming token -> text: never split a UTF-8 character, never leak a stop string or hidden reasoning."""
from __future__ import annotations

import codecs
from functools import cached_property

from edge_llama import Model
from edge_models import chat_format

from edge_runtime.core.template import ThinkFilter, partial_suffix_len


class PieceTable:
    """Token id -> bytes, cached (generation revisits the same few thousand tokens)."""

    def __init__(self, model: Model) -> None:
        self._model = model
        self._cache: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        piece = self._cache.get(token)
        if piece is None:
            # special=False: control tokens (<|im_end|>, <|vision_start|>) render as "".
            piece = self._model.piece(token, special=False)
            self._cache[token] = piece
        return piece

    @cached_property
    def think_close(self) -> tuple[int, ...]:
        """The tokens a thinking budget forces to end the reasoning: the family's close tag on a line
        of its own and a blank line (the shape Qwen's Thinking models write it in)."""
        fmt = chat_format(self._model.meta("general.architecture"))
        return tuple(self._model.tokenize(f"\n{fmt.think_close}\n\n", parse_special=True))


class Utf8Stream:
    """Bytes in, complete characters out; a character split over tokens waits for its tail."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Holds back text that may be the start of a stop string.

    `feed` returns (text safe to show, stopped). Once stopped, the stop string
    and everything after it are dropped.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self._stops:
            return text, False
        buf = self._pending + text
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            self.stopped = True
            return buf[:cut], True
        keep = partial_suffix_len(buf, self._stops)
        self._pending = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out


class TextPipeline:
    """Generated tokens -> the text a user sees: whole UTF-8 characters, <think> reasoning set apart
    (`take_reasoning`), stop strings held back until they cannot match. VisionChat and the server both
    use it. With keep_think the raw text is shown, reasoning and tags inline (llama-server's
    reasoning_format "none"); the reasoning is still tracked, for the thinking budget and grammar."""

    def __init__(self, pieces: PieceTable, stops: tuple[str, ...], keep_think: bool, starts_inside_think: bool) -> None:
        self._pieces = pieces
        self._utf8 = Utf8Stream()
        self._think = ThinkFilter(starts_inside=starts_inside_think)
        self._keep_think = keep_think
        self._stops = StopMatcher(stops)

    @property
    def stopped(self) -> bool:
        """A stop string appeared: nothing more is shown, generation should end."""
        return self._stops.stopped

    @property
    def thinking(self) -> bool:
        """The text so far ends inside a reasoning block."""
        return self._think.inside

    def take_reasoning(self) -> str:
        """Reasoning produced since the last call ("" with keep_think: it is in the text)."""
        reasoning = self._think.take_reasoning()
        return "" if self._keep_think else reasoning

    def feed(self, token: int) -> str:
        raw = self._utf8.feed(self._pieces(token))
        text = self._think.feed(raw)
        out, _ = self._stops.feed(raw if self._keep_think else text)
        return out

    def finish(self) -> str:
        """Text held back at the end (a partial character, a partial stop string)."""
        if self._stops.stopped:
            return ""
        raw = self._utf8.flush()
        tail = self._think.feed(raw) + self._think.flush()
        tail, _ = self._stops.feed(raw if self._keep_think else tail)
        return tail + self._stops.flush()
