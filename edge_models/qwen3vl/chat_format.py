"""Qwen3-VL's chat markup: ChatML turns, the vision placeholder, end-of-turn tokens, <think> tags."""
from __future__ import annotations

from ..chat_format import ChatFormat

# A ChatML template of Qwen's shape, for GGUFs that carry none. Only user/system/
# assistant turns with text, images and videos: tools are not used by this runtime.
DEFAULT_TEMPLATE = (
    "{%- for message in messages %}\n"
    "    {{- '<|im_start|>' + message.role + '\\n' }}\n"
    "    {%- if message.content is string %}\n"
    "        {{- message.content }}\n"
    "    {%- elif message.content is not none %}\n"
    "        {%- for part in message.content %}\n"
    "            {%- if part.type == 'image' or 'image' in part or 'image_url' in part %}\n"
    "                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}\n"
    "            {%- elif part.type == 'video' or 'video' in part %}\n"
    "                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}\n"
    "            {%- elif 'text' in part %}\n"
    "                {{- part.text }}\n"
    "            {%- endif %}\n"
    "        {%- endfor %}\n"
    "    {%- endif %}\n"
    "    {{- '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

CHAT_FORMAT = ChatFormat(
    vision_start="<|vision_start|>",
    image_pad="<|image_pad|>",
    vision_end="<|vision_end|>",
    default_template=DEFAULT_TEMPLATE,
    end_of_turn=("<|im_end|>", "<|endoftext|>"),
    think_open="<think>",
    think_close="</think>",
    grounding_coord_range=1000.0,  # Qwen3-VL answers grounding prompts in a 0..1000 frame
    video_pad="<|video_pad|>",
    video_timestamp="<{seconds:.1f} seconds>",  # as Qwen3VLProcessor writes it
)
