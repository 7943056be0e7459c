"""OpenAI messages -> the prompt text the engine tokenizes, as `VisionChat` renders it.

Rendering (Jinja) and image decoding are plain Python, so the HTTP layer does
them in worker threads; the scheduler thread is left with llama.cpp work only.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import VisionUnsupportedError
from ..messages import ImageLoader, VideoLoader, split_messages, videos_in
from ..prompt import ImageInput
from ..template import THINK_OPEN, ChatTemplate, render_with_markers


@dataclass(frozen=True)
class PromptFormat:
    """What rendering needs to know about the loaded model."""

    template: ChatTemplate
    marker: str  # mtmd's media marker, one per image
    has_vision: bool
    model_name: str


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    images: list[ImageInput]
    starts_inside_think: bool  # the template opened <think> itself (Thinking models)


def render_prompt(fmt: PromptFormat, messages: list[dict], load: ImageLoader, load_video: VideoLoader) -> RenderedPrompt:
    """Load the images and videos (through loaders that enforce the server's policy) and render."""
    template_messages, images = split_messages(messages, load=load, load_video=load_video)
    if images and not fmt.has_vision:
        raise VisionUnsupportedError(f"{fmt.model_name} was loaded without a projector (mmproj): it cannot see images")
    text = render_with_markers(fmt.template, template_messages, len(images), fmt.marker if fmt.has_vision else None,
                               videos_in(template_messages))
    return RenderedPrompt(text, images, text.rstrip().endswith(THINK_OPEN))
