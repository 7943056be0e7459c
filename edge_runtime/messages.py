"""OpenAI-style message lists -> (template messages, images in prompt order).

Accepted content parts: {"type": "text", "text"}, {"type": "image_url",
"image_url": {"url": data URI | path | file://}} (or a bare string), and
{"type": "image", "image": path | bytes | PIL | numpy | ImageInput}. Image parts
become {"type": "image"}, which Qwen's chat template renders as its vision
placeholder; the images themselves are returned in the order they appear.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from .errors import EmptyPromptError
from .images import ImageLimits, image_digest, load_image, to_rgb_array
from .prompt import ImageInput

ImageLoader = Callable[[Any, str], ImageInput]


def image_input(src: Any, name: str = "image", limits: ImageLimits = ImageLimits()) -> ImageInput:
    """Load any supported image source once: pixels for mtmd, digest for the caches."""
    if isinstance(src, ImageInput):
        return src
    img = load_image(src, name=name, limits=limits)
    return ImageInput.from_array(to_rgb_array(img), image_digest(img))


def split_messages(
    messages: Sequence[dict], load: ImageLoader = image_input
) -> tuple[list[dict], list[ImageInput]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise EmptyPromptError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out: list[dict] = []
    images: list[ImageInput] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'")
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            parts = []
            for j, part in enumerate(content):
                src = _image_source(part)
                if src is None:
                    parts.append({"type": "text", "text": part} if isinstance(part, str) else part)
                    continue
                images.append(load(src, f"messages[{i}].content[{j}]"))
                parts.append({"type": "image"})
            content = parts
        out.append({**message, "content": content})
    if not any(_has_content(m.get("content")) for m in out if m.get("role") == "user") and not images:
        raise EmptyPromptError("the messages hold no user text and no image: nothing to answer")
    return out, images


def user_message(prompt: str, images: Sequence[ImageInput]) -> dict:
    """A user turn as Qwen lays it out: images first, then the question."""
    parts: list[dict] = [{"type": "image", "image": img} for img in images]
    if prompt:
        parts.append({"type": "text", "text": prompt})
    return {"role": "user", "content": parts}


def _image_source(part: Any) -> Any | None:
    if isinstance(part, ImageInput):
        return part
    if not isinstance(part, dict):
        return None
    kind = part.get("type")
    if kind == "image_url" or (kind is None and "image_url" in part):
        ref = part.get("image_url")
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not url:
            raise ValueError("an image_url part needs image_url.url (a data URI or a local path)")
        return url
    if kind == "image" or (kind is None and "image" in part):
        src = part.get("image")
        if src is None:
            raise ValueError("an image part needs an 'image' value (path, bytes, PIL image or array)")
        return src
    return None


def _has_content(content: Any) -> bool:
    if isinstance(content, str):
        return bool(content.strip())
    if isinstance(content, (list, tuple)):
        return any(isinstance(p, dict) and str(p.get("text", "")).strip() for p in content)
    return False
