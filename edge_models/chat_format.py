"""What the runtime must know of a model family's chat markup, as data.

The engine, VisionChat and the server read a ChatFormat; only the family's
package (edge_models/<family>/chat_format.py) spells its tokens.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatFormat:
    vision_start: str  # the tokens a template renders for one image ...
    image_pad: str
    vision_end: str
    default_template: str  # jinja template for GGUFs that carry none
    end_of_turn: tuple[str, ...]  # texts that end an answer even if the vocab does not flag them as EOG
    think_open: str  # reasoning markers of Thinking variants, cut from what the user sees
    think_close: str
    grounding_coord_range: float  # boxes and points in grounding answers span 0..this on each axis
    video_pad: str = ""  # the pad a template renders for one video ("" when the family has none)
    video_timestamp: str = ""  # text before each frame group of a clip, str.format(seconds=...)
    tool_call_open: str = ""  # a function call is JSON {"name", "arguments"} between these markers
    tool_call_close: str = ""
    tools_template: str = ""  # the family's template with tools, for GGUFs whose template has none
    thinking_tools_template: str = ""  # the same for a Thinking model's GGUF (it opens <think> to answer)

    @property
    def image_placeholder(self) -> str:
        return self.vision_start + self.image_pad + self.vision_end

    @property
    def video_placeholder(self) -> str:
        return self.vision_start + self.video_pad + self.vision_end if self.video_pad else ""
