"""edge_runtime.core.template: HF-compatible rendering, image placeholders, think stripping."""
from __future__ import annotations

import re

import pytest

from edge_runtime.core.template import (
    DEFAULT_QWEN3_VL_TEMPLATE,
    IMAGE_PLACEHOLDER,
    ChatTemplate,
    TemplateError,
    ThinkFilter,
    normalize_messages,
    replace_image_placeholders,
    strip_think,
)

MARKER = "<__media__>"

# The Qwen2-VL/2.5-VL template as published with the HF processors (one line).
QWEN_VL_HF_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def user(*parts):
    return {"role": "user", "content": list(parts)}


IMG_URL = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


# --- rendering ----------------------------------------------------------------


def test_default_template_string_content():
    text = ChatTemplate(DEFAULT_QWEN3_VL_TEMPLATE).render(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_default_template_list_content_and_no_generation_prompt():
    tpl = ChatTemplate(DEFAULT_QWEN3_VL_TEMPLATE)
    messages = [
        user({"type": "image"}, {"type": "text", "text": "What is this?"}),
        {"role": "assistant", "content": "A cat."},
    ]
    text = tpl.render(messages, add_generation_prompt=False)
    assert text == (
        f"<|im_start|>user\n{IMAGE_PLACEHOLDER}What is this?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
    )


def test_hf_qwen_template_renders_images_and_vision_ids():
    tpl = ChatTemplate(QWEN_VL_HF_TEMPLATE)
    text = tpl.render([user({"type": "image"}, IMG_URL, {"type": "text", "text": "Compare."})], add_vision_id=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert f"Picture 1: {IMAGE_PLACEHOLDER}Picture 2: {IMAGE_PLACEHOLDER}Compare.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_image_url_parts_become_image_parts_for_image_only_templates():
    only_image = (
        "{% for m in messages %}{% for p in m.content %}"
        "{% if p.type == 'image' %}[IMG]{% elif p.type == 'text' %}{{ p.text }}{% endif %}"
        "{% endfor %}{% endfor %}"
    )
    messages = [user(IMG_URL, {"type": "text", "text": "a"}, {"image_url": {"url": "x"}})]
    assert ChatTemplate(only_image).render(messages) == "[IMG]a[IMG]"
    # The caller's messages are not modified.
    assert messages[0]["content"][0] is IMG_URL and IMG_URL["type"] == "image_url"


def test_normalize_messages_copies_and_accepts_plain_string_parts():
    src = [user("hello", {"type": "image"})]
    out = normalize_messages(src)
    assert out == [{"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "image"}]}]
    assert src[0]["content"][0] == "hello"


def test_hf_globals_tojson_and_special_tokens():
    source = (
        "{{ bos_token }}{{ tools | tojson }}|{{ tools | tojson(indent=2) | length > 0 }}|"
        "{{ strftime_now('%Y') | length }}|{{ enable_thinking }}|{{ eos_token }}"
    )
    tpl = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    text = tpl.render([], tools=[{"name": "météo", "html": "<b>"}], enable_thinking=False)
    # HF's tojson keeps non-ASCII and does not HTML-escape.
    assert text == '<s>[{"name": "météo", "html": "<b>"}]|True|4|False|</s>'


def test_raise_exception_becomes_template_error():
    tpl = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok")
    assert tpl.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(TemplateError, match="first must be user"):
        tpl.render([{"role": "assistant", "content": "x"}])


def test_generation_tag_and_loop_controls():
    source = (
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% generation %}{{ m.content }};{% endgeneration %}{% endfor %}"
    )
    assert ChatTemplate(source).render([{"role": "user", "content": c} for c in "abc"]) == "a;b;"


def test_trim_blocks_and_lstrip_blocks_are_on():
    source = "{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}\n"
    assert ChatTemplate(source).render([{"role": "user", "content": "x"}]) == "x\n"


def test_sandbox_blocks_mutation_and_unsafe_access():
    with pytest.raises(TemplateError, match="render"):
        ChatTemplate("{{ messages.append(1) }}").render([])
    with pytest.raises(TemplateError):
        ChatTemplate("{{ ''.__class__.__mro__ }}").render([])


def test_broken_template_and_bad_messages():
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(TemplateError, match="empty"):
        ChatTemplate("  ")
    tpl = ChatTemplate(DEFAULT_QWEN3_VL_TEMPLATE)
    with pytest.raises(TemplateError, match=r"messages\[1\] has no string 'role'"):
        tpl.render([{"role": "user", "content": "a"}, {"content": "b"}])
    with pytest.raises(TemplateError, match=r"messages\[0\].content must be a string or a list"):
        tpl.render([{"role": "user", "content": 5}])
    with pytest.raises(TemplateError, match=r"messages\[0\].content\[1\] must be a dict"):
        tpl.render([user({"type": "text", "text": "a"}, 3)])
    with pytest.raises(TemplateError, match="list of dicts"):
        tpl.render("hello")  # type: ignore[arg-type]


# --- image placeholders ---------------------------------------------------------


def test_replace_image_placeholders_counts():
    prompt = ChatTemplate(DEFAULT_QWEN3_VL_TEMPLATE).render(
        [user({"type": "image"}, IMG_URL, {"type": "text", "text": "Which differs?"})]
    )
    out, n = replace_image_placeholders(prompt, MARKER)
    assert n == 2
    assert out.count(MARKER) == 2
    assert "<|image_pad|>" not in out and "<|vision_start|>" not in out
    assert f"user\n{MARKER}{MARKER}Which differs?" in out


def test_replace_tolerates_expanded_and_bare_pads():
    text = "a <|vision_start|><|image_pad|><|image_pad|>\n<|image_pad|><|vision_end|> b <|image_pad|> c"
    out, n = replace_image_placeholders(text, MARKER)
    assert (out, n) == (f"a {MARKER} b {MARKER} c", 2)


def test_replace_without_images_and_bad_marker():
    assert replace_image_placeholders("plain text", MARKER) == ("plain text", 0)
    with pytest.raises(ValueError, match="marker"):
        replace_image_placeholders(IMAGE_PLACEHOLDER, "")


# --- think stripping -------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, visible",
    [
        ("<think>\nLet me look.\n</think>\n\nA cat.", "A cat."),
        ("Reasoning without an opening tag.\n</think>\n\nA dog.", "A dog."),
        ("  \n<think>x</think>  Answer", "Answer"),
        ("Before <think>x</think> after", "Before after"),
        ("<think>a</think>one <think>b</think>two", "one two"),
        ("Answer, then <think>cut off mid-thought", "Answer, then "),
        ("No tags at all.", "No tags at all."),
        ("  indented, no tags", "  indented, no tags"),
        ("<think></think>\n\nEmpty reasoning.", "Empty reasoning."),
        ("a < b and <thinking> is not a tag", "a < b and <thinking> is not a tag"),
    ],
)
def test_strip_think(raw: str, visible: str):
    assert strip_think(raw) == visible


STREAM_SAMPLES = [
    "<think>\nLet me look.\n</think>\n\nA cat.",
    "  \n<think>x</think>  Answer",
    "Before <think>x</think> after <think>y</think>\nend",
    "Answer, then <think>cut off mid-thought",
    "a < b and <thinking> </thin is not a tag <",
    "<think>a</think><think>b</think>",
]


@pytest.mark.parametrize("raw", STREAM_SAMPLES)
def test_think_filter_matches_strip_think_for_every_split(raw: str):
    expected = strip_think(raw)
    for cut in range(len(raw) + 1):
        for second in (cut, min(cut + 3, len(raw))):
            f = ThinkFilter()
            pieces = [raw[:cut], raw[cut:second], raw[second:]]
            assert "".join(f.feed(p) for p in pieces) + f.flush() == expected, (cut, second)


def test_think_filter_one_char_at_a_time():
    raw = "<think>\nhmm\n</think>\n\nHello <b>world</b>"
    f = ThinkFilter()
    out = [f.feed(ch) for ch in raw]
    assert "".join(out) + f.flush() == "Hello <b>world</b>"
    # Visible text streams out before the end: nothing is held once a piece is unambiguous.
    assert "".join(out[: raw.index("world") + 1]) == "Hello <b>w"


def test_think_filter_starts_inside_for_thinking_models():
    raw = "The user wants a caption.\n</think>\n\nA red bus."
    assert strip_think(raw) == "A red bus."
    for cut in range(len(raw) + 1):
        f = ThinkFilter(starts_inside=True)
        assert f.feed(raw[:cut]) + f.feed(raw[cut:]) + f.flush() == "A red bus."


def test_think_filter_hides_unclosed_block_and_drops_stray_close():
    f = ThinkFilter()
    assert f.feed("Hi <think>never") == "Hi "
    assert f.feed(" ends") == ""
    assert f.flush() == ""
    g = ThinkFilter()
    assert g.feed("one</think>  two") + g.flush() == "onetwo"


def test_think_filter_filter_generator():
    pieces = ["<thi", "nk>x</th", "ink>", "\n", "Hel", "lo", " <", "b>"]
    out = list(ThinkFilter().filter(pieces))
    assert "".join(out) == "Hello <b>"
    assert all(out)  # no empty strings yielded
    assert re.fullmatch(r"Hel", out[0])
