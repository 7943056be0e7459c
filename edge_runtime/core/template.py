"""Chat prompts from the GGUF's Jinja chat template, rendered as Hugging Face does.

The template decides the prompt the model was trained on, so it is rendered with
the same sandboxed Jinja setup transformers uses (same globals, same `tojson`).
Images appear in the rendered text as Qwen's vision placeholder; llama.cpp's
mtmd wants its own media marker there instead and adds the vision tokens itself.
The model's reasoning (`<think>...</think>`) is cut from what the user sees,
both for whole answers and for streamed pieces.
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, Iterable, Iterator, Sequence

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_common.errors import EdgeError
from edge_models import chat_format

__all__ = [
    "ChatTemplate",
    "DEFAULT_QWEN3_VL_TEMPLATE",
    "IMAGE_PLACEHOLDER",
    "VIDEO_PLACEHOLDER",
    "TemplateError",
    "ThinkFilter",
    "normalize_messages",
    "opens_think",
    "replace_image_placeholders",
    "strip_think",
]

# The default family's markup (edge_models): GGUFs without a template get its default one.
FORMAT = chat_format()
VISION_START, IMAGE_PAD, VISION_END = FORMAT.vision_start, FORMAT.image_pad, FORMAT.vision_end
IMAGE_PLACEHOLDER = FORMAT.image_placeholder
# transformers 4.57 (Qwen's reference) and vLLM replace this whole triple with the clip's
# timestamped frame groups; each group then gets its own vision start/end.
VIDEO_PAD, VIDEO_PLACEHOLDER = FORMAT.video_pad, FORMAT.video_placeholder
THINK_OPEN, THINK_CLOSE = FORMAT.think_open, FORMAT.think_close
DEFAULT_QWEN3_VL_TEMPLATE = FORMAT.default_template


class TemplateError(EdgeError, ValueError):
    """The chat template or the messages given to it are unusable; the message says which."""


def template_for(engine: Any, override: str | None = None) -> "ChatTemplate":
    """The template a loaded model chats with: `override`, else the GGUF's own, else its family's default.

    One place for VisionChat and the server; `engine` is an Engine (chat_template, arch, special tokens).
    """
    return ChatTemplate(
        override or engine.chat_template or chat_format(engine.arch).default_template,
        bos_token=engine.special_token_text("bos") or "",
        eos_token=engine.special_token_text("eos") or "",
    )


class _GenerationTag(Extension):
    """HF's `{% generation %}` marks assistant spans for training masks; rendering ignores it."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # HF's filter: not Jinja's HTML-escaping one, so quotes and '<' stay as written.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A chat template compiled once; render() is cheap and thread-safe."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        if not isinstance(source, str) or not source.strip():
            raise TemplateError(
                "chat template is empty; pass the GGUF's tokenizer.chat_template or DEFAULT_QWEN3_VL_TEMPLATE"
            )
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(
                f"chat template does not compile (line {exc.lineno}: {exc.message}); "
                "pass a working template, e.g. DEFAULT_QWEN3_VL_TEMPLATE"
            ) from None
        self.source = source
        self._thinking: bool | None = None
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text; `extra` reaches the template as variables (e.g. enable_thinking=False)."""
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, **extra}
        try:
            return self._template.render(
                messages=normalize_messages(messages), add_generation_prompt=add_generation_prompt, **variables
            )
        except TemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise TemplateError(f"chat template failed to render: {type(exc).__name__}: {exc}") from None


    @property
    def thinking(self) -> bool:
        """A Thinking model's template: its generation prompt opens the reasoning block (Qwen3-VL-*-Thinking),
        so every answer starts inside <think> and the runtime separates the reasoning from the answer."""
        if self._thinking is None:
            try:
                probe = self.render([{"role": "user", "content": "?"}], add_generation_prompt=True)
            except TemplateError:
                probe = ""
            self._thinking = opens_think(probe)
        return self._thinking


def opens_think(prompt: str) -> bool:
    """The rendered prompt ends inside a reasoning block the template opened."""
    return prompt.rstrip().endswith(THINK_OPEN)


def normalize_messages(messages: list[dict]) -> list[dict]:
    """Copies with image_url parts turned into {"type": "image"}, the form Qwen's template expects."""
    if not isinstance(messages, (list, tuple)):
        raise TemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TemplateError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise TemplateError(f"messages[{i}] has no string 'role'; use 'system', 'user' or 'assistant'")
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            content = [_normalize_part(i, j, part) for j, part in enumerate(content)]
        elif content is not None and not isinstance(content, str):
            raise TemplateError(
                f"messages[{i}].content must be a string or a list of parts, got {type(content).__name__}"
            )
        out.append({**message, "content": content})
    return out


def _normalize_part(i: int, j: int, part: Any) -> dict:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict):
        raise TemplateError(f"messages[{i}].content[{j}] must be a dict part, got {type(part).__name__}")
    if part.get("type") == "image_url" or ("image_url" in part and "type" not in part):
        return {"type": "image"}
    return dict(part)


# Qwen's wrapped pad, possibly repeated (an expanded prompt), or a bare run of pads.
_PLACEHOLDER_RE = re.compile(
    re.escape(VISION_START) + r"\s*(?:" + re.escape(IMAGE_PAD) + r"\s*)+" + re.escape(VISION_END)
    + r"|(?:" + re.escape(IMAGE_PAD) + r")+"
)


def replace_image_placeholders(text: str, marker: str) -> tuple[str, int]:
    """Swap each image placeholder for mtmd's marker; the count must equal the images passed."""
    if not isinstance(marker, str) or not marker:
        # a plain ValueError: the marker comes from mtmd, never from a user: a programming error
        raise ValueError("marker must be a non-empty string (mtmd's media marker, e.g. '<__media__>')")
    return _PLACEHOLDER_RE.subn(lambda _: marker, text)


_MEDIA_RE = re.compile(
    "(?P<image>" + _PLACEHOLDER_RE.pattern + ")|(?P<video>" + re.escape(VISION_START) + r"\s*" + re.escape(VIDEO_PAD)
    + r"\s*" + re.escape(VISION_END) + "|" + re.escape(VIDEO_PAD) + ")"
)
_THINK_RE = re.compile(re.escape(THINK_OPEN) + r".*?(?:" + re.escape(THINK_CLOSE) + r"\s*|\Z)"
                       + r"|" + re.escape(THINK_CLOSE) + r"\s*", re.DOTALL)


def strip_think(text: str) -> str:
    """The answer without reasoning: <think> blocks, an unclosed <think> tail, and a leading
    `...</think>` (Thinking models start inside the block the prompt opened) are removed."""
    close, opening = text.find(THINK_CLOSE), text.find(THINK_OPEN)
    if close >= 0 and (opening < 0 or close < opening):
        text = text[close + len(THINK_CLOSE):].lstrip()
    first = _THINK_RE.search(text)
    if first is None:
        return text
    stripped = _THINK_RE.sub("", text)
    return stripped.lstrip() if not text[: first.start()].strip() else stripped


def partial_suffix_len(buf: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of buf that could still grow into one of tags (a <think> tag, a
    stop string): what a stream holds back until the next piece decides."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(buf)), best, -1):
            if buf.endswith(tag[:n]):
                best = n
                break
    return best


class ThinkFilter:
    """Streaming strip_think: feed() pieces as they are generated, get the visible text; the
    reasoning it hides is kept apart for `take_reasoning` (VisionChat's and edge-serve's
    `reasoning_content`).

    Tags may be split across pieces, so a possible tag prefix is held back until
    the next piece decides it. A stream cannot look ahead for a `</think>` with no
    opening tag: pass starts_inside=True when the prompt itself opened the block
    (it ended in "<think>"), as Qwen3 Thinking templates do. Whitespace around the
    reasoning (the template's newline after the tag, the model's before the close) is
    not part of it, as llama-server trims it.
    """

    def __init__(self, *, starts_inside: bool = False) -> None:
        self._inside = starts_inside
        self._buf = ""
        self._skip_ws = False  # drop whitespace right after a removed block
        self._shown = False  # any non-whitespace text emitted yet
        self._reasoning: list[str] = []  # hidden text not yet taken
        self._reasoning_ws = ""  # trailing whitespace of the reasoning, kept until more follows
        self._reasoned = False  # any non-whitespace reasoning seen in this block

    @property
    def inside(self) -> bool:
        """The model is reasoning: the text fed last is inside a <think> block."""
        return self._inside

    def take_reasoning(self) -> str:
        """The reasoning hidden since the last call."""
        out, self._reasoning = "".join(self._reasoning), []
        return out

    def feed(self, piece: str) -> str:
        self._buf += piece
        out: list[str] = []
        while True:
            if self._inside:
                end = self._buf.find(THINK_CLOSE)
                if end < 0:
                    keep = partial_suffix_len(self._buf, (THINK_CLOSE,))
                    self._reason(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                self._reason(self._buf[:end])
                self._buf = self._buf[end + len(THINK_CLOSE):]
                self._inside, self._skip_ws = False, True
                self._reasoning_ws, self._reasoned = "", False
                continue
            if self._skip_ws:
                self._buf = self._buf.lstrip()
                if not self._buf:
                    break
                self._skip_ws = False
            opening, close = self._buf.find(THINK_OPEN), self._buf.find(THINK_CLOSE)
            hits = [(pos, tag) for pos, tag in ((opening, THINK_OPEN), (close, THINK_CLOSE)) if pos >= 0]
            if hits:
                pos, tag = min(hits)
                self._emit(out, self._buf[:pos], before_tag=True)
                self._buf = self._buf[pos + len(tag):]
                self._inside = tag == THINK_OPEN
                self._skip_ws = not self._inside
                continue
            keep = partial_suffix_len(self._buf, (THINK_OPEN, THINK_CLOSE))
            visible = self._buf[: len(self._buf) - keep]
            if not self._shown and not visible.strip():
                break  # hold leading whitespace: it goes if a think block follows
            self._emit(out, visible, before_tag=False)
            self._buf = self._buf[len(visible):]
            break
        return "".join(out)

    def flush(self) -> str:
        """What is still held at the end of the stream (an unclosed block stays hidden; the part of
        a close tag it ended with is reasoning)."""
        if self._inside:
            self._reason(self._buf)
        rest, self._buf = ("" if self._inside or self._skip_ws else self._buf), ""
        return rest

    def filter(self, pieces: Iterable[str]) -> Iterator[str]:
        """Visible text for each piece of a stream, flushed at its end; empty strings skipped."""
        for piece in pieces:
            text = self.feed(piece)
            if text:
                yield text
        tail = self.flush()
        if tail:
            yield tail

    def _reason(self, text: str) -> None:
        text = self._reasoning_ws + text
        if not self._reasoned:
            text = text.lstrip()
        body = text.rstrip()
        self._reasoning_ws = text[len(body):]
        if body:
            self._reasoning.append(body)
            self._reasoned = True

    def _emit(self, out: list[str], text: str, *, before_tag: bool) -> None:
        if before_tag and not self._shown and not text.strip():
            return  # whitespace before the first removed block is dropped, as strip_think does
        if text:
            out.append(text)
            self._shown = self._shown or bool(text.strip())


def render_with_markers(
    template: ChatTemplate, messages: list[dict], n_images: int, marker: str | None, videos: Sequence[Any] = (),
    **extra: Any,
) -> str:
    """Render a conversation for the engine: each image placeholder becomes mtmd's media marker,
    each video placeholder the clip's `prompt_text(marker)` (timestamps and frame markers).

    `n_images` counts every bitmap handed to mtmd (video frames included); `marker` None
    means a text-only model (no projector): the text is returned as rendered. `extra` reaches the
    template as variables (e.g. tools=[...]).
    """
    text = template.render(messages, add_generation_prompt=True, **extra)
    if marker is None:
        return text
    clips = iter(videos)
    n_markers = 0

    def swap(match: re.Match) -> str:
        nonlocal n_markers
        if match.lastgroup == "image":
            n_markers += 1
            return marker
        clip = next(clips, None)
        if clip is None:
            raise TemplateError("the chat template placed more videos than the messages carry")
        out = clip.prompt_text(marker)
        n_markers += out.count(marker)
        return out

    text = _MEDIA_RE.sub(swap, text)
    if next(clips, None) is not None or n_markers != n_images:
        raise TemplateError(
            f"the chat template placed {n_markers} image(s)/frame(s) for the {n_images} given (and "
            f"{len(videos)} video(s)); images and videos are only supported where the template renders them (user turns)"
        )
    return text
