"""OpenAI messages -> the prompt text the engine tokenizes, as `VisionChat` renders it.

Rendering (Jinja) and image decoding are plain Python, so the HTTP layer does
them in worker threads; the scheduler thread is left with llama.cpp work only.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import VisionUnsupportedError
from edge_runtime.chat.messages import ImageLoader, VideoLoader, split_messages, videos_in
from edge_runtime.vision.image_input import ImageInput
from edge_runtime.core.template import ChatTemplate, opens_think, render_with_markers
from edge_runtime.chat.tool_calls import template_for, uses_tools


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


def render_prompt(fmt: PromptFormat, messages: list[dict], load: ImageLoader, load_video: VideoLoader,
                  tools: list[dict] | None = None, template_kwargs: dict | None = None) -> RenderedPrompt:
    """Load the images and videos (through loaders that enforce the server's policy) and render.

    Tools, tool calls, tool results and videos need a template that renders them (see `template_for`).
    `template_kwargs` are the request's chat_template_kwargs (e.g. enable_thinking=False).
    """
    template_messages, images = split_messages(messages, load=load, load_video=load_video)
    if images and not fmt.has_vision:
        raise VisionUnsupportedError(f"{fmt.model_name} was loaded without a projector (mmproj): it cannot see images")
    videos = videos_in(template_messages)
    template = template_for(fmt.template, tools=bool(tools) or uses_tools(template_messages), videos=bool(videos))
    extra = {**(template_kwargs or {}), **({"tools": tools} if tools else {})}
    text = render_with_markers(template, template_messages, len(images), fmt.marker if fmt.has_vision else None,
                               videos, **extra)
    return RenderedPrompt(text, images, opens_think(text))
