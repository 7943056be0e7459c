"""OpenAI-style message lists -> (template messages, images in prompt order).

Accepted content parts: {"type": "text", "text"}, {"type": "image_url",
"image_url": {"url": data URI | path | file://, "detail": "low" | "auto" | "high"}}
(or a bare string), and
{"type": "image", "image": path | bytes | PIL | numpy | ImageInput}. Image parts
become {"type": "image"}, which Qwen's chat template renders as its vision
placeholder; the images themselves are returned in the order they appear.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from .errors import EmptyPromptError
from .image_budget import ImagePlan, check_detail
from .images import ImageLimits, image_digest, load_image, to_rgb_array
from .prompt import ImageInput

# (source, name for errors, detail or None) -> ImageInput
ImageLoader = Callable[[Any, str, "str | None"], ImageInput]


def image_input(
    src: Any, name: str = "image", limits: ImageLimits = ImageLimits(), plan: ImagePlan | None = None
) -> ImageInput:
    """Load any supported image source once: pixels for mtmd, digest for the caches.

    With a `plan`, the pixels are resized as the HF processor would for its budget
    (a large JPEG decoded at reduced scale), so mtmd leaves them as they are.
    """
    if isinstance(src, ImageInput):
        return src
    if plan is None:
        img = load_image(src, name=name, limits=limits)
        return ImageInput.from_array(to_rgb_array(img), image_digest(img))
    seen: list[tuple[int, int]] = []

    def fit(size: tuple[int, int]) -> tuple[int, int]:
        seen.append(size)
        return plan.size_for(size)

    img = load_image(src, name=name, limits=limits, fit=fit)
    return ImageInput.from_array(to_rgb_array(img), image_digest(img), plan, seen[0] if seen else None)


def _default_load(src: Any, name: str, detail: str | None) -> ImageInput:
    return image_input(src, name)


def split_messages(
    messages: Sequence[dict], load: ImageLoader = _default_load
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
                where = f"messages[{i}].content[{j}]"
                images.append(load(src, where, _detail(part, where)))
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


def _detail(part: Any, where: str) -> str | None:
    """OpenAI's image_url.detail (also accepted beside an "image" part); None if not given."""
    if not isinstance(part, dict):
        return None
    ref = part.get("image_url")
    detail = ref.get("detail") if isinstance(ref, dict) else part.get("detail")
    if detail is None:
        return None
    return check_detail(detail, f"{where}.detail")


def _has_content(content: Any) -> bool:
    if isinstance(content, str):
        return bool(content.strip())
    if isinstance(content, (list, tuple)):
        return any(isinstance(p, dict) and str(p.get("text", "")).strip() for p in content)
    return False
