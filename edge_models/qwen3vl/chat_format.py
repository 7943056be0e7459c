"""Qwen3-VL's chat markup: ChatML turns, the vision placeholder, end-of-turn tokens, <think> tags."""
from __future__ import annotations

from ..chat_format import ChatFormat

# A ChatML template of Qwen's shape, for GGUFs that carry none. Only user/system/
# assistant turns with text, images and videos (TOOLS_TEMPLATE below renders tools).
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

# Qwen3-VL's template with tools, tool calls and tool responses (as in the checkpoint's
# tokenizer_config.json), for GGUFs whose template has no tool support: the format the
# model was trained on, so a request with tools renders as Qwen's would.
TOOLS_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content is not none -%}{%- for part in content -%}"
    "{%- if part.type == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part.type == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}{{- part.text -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0].role == 'system' -%}{{- text(messages[0].content) + '\\n\\n' -}}{%- endif -%}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' -}}"
    "{%- elif messages[0].role == 'system' -%}"
    "{{- '<|im_start|>system\\n' + text(messages[0].content) + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + text(message.content) + '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' + text(message.content) -}}"
    "{%- for call in message.tool_calls or [] -%}"
    "{%- if (loop.first and message.content) or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{%- set call = call.function if call.function is defined else call -%}"
    "{{- '<tool_call>\\n{\\\"name\\\": \\\"' + call.name + '\\\", \\\"arguments\\\": ' -}}"
    "{%- if call.arguments is string -%}{{- call.arguments -}}{%- else -%}{{- call.arguments | tojson -}}{%- endif -%}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + text(message.content) + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _replace_once(template: str, old: str, new: str) -> str:
    assert template.count(old) == 1, f"the template changed shape: {old!r} is not there once"
    return template.replace(old, new)


# The Qwen3-VL-*-Thinking templates' shape (for tests, and Thinking GGUFs converted without one): the
# generation prompt opens the reasoning block, so the model starts inside it, and an earlier assistant
# turn keeps only its answer (what followed the close tag).
THINKING_TEMPLATE = _replace_once(_replace_once(
    DEFAULT_TEMPLATE,
    "    {%- if message.content is string %}\n",
    "    {%- if message.role == 'assistant' and message.content is string %}\n"
    "        {{- message.content.split('</think>')[-1].lstrip() }}\n"
    "    {%- elif message.content is string %}\n"),
    "    {{- '<|im_start|>assistant\\n' }}\n", "    {{- '<|im_start|>assistant\\n<think>\\n' }}\n")

# TOOLS_TEMPLATE for Thinking GGUFs whose own template renders no tools, changed the same two ways.
THINKING_TOOLS_TEMPLATE = _replace_once(_replace_once(
    TOOLS_TEMPLATE,
    "{{- '<|im_start|>assistant\\n' + text(message.content) -}}",
    "{{- '<|im_start|>assistant\\n' + (message.content.split('</think>')[-1].lstrip() "
    "if message.content is string else text(message.content)) -}}"),
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}",
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}")

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
    tool_call_open="<tool_call>",
    tool_call_close="</tool_call>",
    tools_template=TOOLS_TEMPLATE,
    thinking_tools_template=THINKING_TOOLS_TEMPLATE,
)
