"""OpenAI messages -> the prompt text the engine tokenizes, as `VisionChat` renders it.

Rendering (Jinja) and image decoding are plain Python, so the HTTP layer does
them in worker threads; the scheduler thread is left with llama.cpp work only.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from ..errors import VisionUnsupportedError
from edge_runtime.chat.messages import ImageLoader, VideoLoader, split_messages, videos_in
from edge_runtime.vision.image_input import ImageInput
from edge_runtime.core.template import ChatTemplate, opens_think, render_with_markers
from edge_runtime.chat.tool_calls import tools_template_for, uses_tools


@dataclass(frozen=True)
class PromptFormat:
    """What rendering needs to know about the loaded model."""

    template: ChatTemplate
    marker: str  # mtmd's media marker, one per image
    has_vision: bool
    model_name: str

    @cached_property
    def tools_template(self) -> ChatTemplate:
        return tools_template_for(self.template)


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    images: list[ImageInput]
    starts_inside_think: bool  # the template opened <think> itself (Thinking models)


def render_prompt(fmt: PromptFormat, messages: list[dict], load: ImageLoader, load_video: VideoLoader,
                  tools: list[dict] | None = None, template_kwargs: dict | None = None) -> RenderedPrompt:
    """Load the images and videos (through loaders that enforce the server's policy) and render.

    Tools, tool calls and tool results need a template that knows them (see `tools_template`).
    `template_kwargs` are the request's chat_template_kwargs (e.g. enable_thinking=False).
    """
    template_messages, images = split_messages(messages, load=load, load_video=load_video)
    if images and not fmt.has_vision:
        raise VisionUnsupportedError(f"{fmt.model_name} was loaded without a projector (mmproj): it cannot see images")
    template = fmt.tools_template if tools or uses_tools(template_messages) else fmt.template
    extra = {**(template_kwargs or {}), **({"tools": tools} if tools else {})}
    text = render_with_markers(template, template_messages, len(images), fmt.marker if fmt.has_vision else None,
                               videos_in(template_messages), **extra)
    return RenderedPrompt(text, images, opens_think(text))
