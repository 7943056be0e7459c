"""OpenAI-style message lists -> (template messages, images in prompt order).

Accepted content parts: {"type": "text", "text"}, {"type": "image_url",
"image_url": {"url": data URI | path | file://, "detail": "low" | "auto" | "high"}}
(or a bare string),
{"type": "image", "image": path | bytes | PIL | numpy | ImageInput},
{"type": "video_url", "video_url": {"url": data URI | path}} (vLLM's spelling) and
{"type": "video", "video": path | bytes | frames | VideoInput}. Image parts become
{"type": "image"} and video parts {"type": "video", "video": VideoInput}, which Qwen's
chat template renders as its vision placeholders; the images (a video's frames in
its place) are returned in the order mtmd needs them.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from edge_runtime.chat.tool_calls import check_tool_calls
from edge_runtime.errors import EmptyPromptError, PromptEncodingError
from edge_runtime.vision.image_budget import ImagePlan, check_detail
from edge_runtime.vision.images import ImageError, ImageLimits, image_digest, load_image, to_rgb_array
from edge_runtime.vision.image_input import ImageInput
from edge_runtime.vision.video import VideoInput, load_video
from edge_runtime.errors import OptionError

# (source, name for errors, detail or None) -> ImageInput
# (source, name, detail, share): share = the images of the message, which split `auto`'s budget
ImageLoader = Callable[[Any, str, "str | None", int], ImageInput]
VideoLoader = Callable[[Any, str], VideoInput]


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


def _default_load(src: Any, name: str, detail: str | None, share: int = 1) -> ImageInput:
    return image_input(src, name)


def split_messages(
    messages: Sequence[dict], load: ImageLoader = _default_load, load_video: VideoLoader = load_video
) -> tuple[list[dict], list[ImageInput]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise EmptyPromptError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out: list[dict] = []
    images: list[ImageInput] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise OptionError(f"messages[{i}] must be a dict with 'role' and 'content'")
        if message.get("tool_calls") is not None:
            check_tool_calls(message["tool_calls"], f"messages[{i}].tool_calls")
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            parts = []
            share = sum(_video_source(part) is None and _image_source(part) is not None for part in content)
            for j, part in enumerate(content):
                name = f"messages[{i}].content[{j}]"
                clip = _video_source(part)
                if clip is not None:
                    video = load_video(clip, name)
                    images.extend(video.frames)
                    parts.append({"type": "video", "video": video})
                    continue
                src = _image_source(part)
                if src is None:
                    if isinstance(part, str):
                        check_text(part, f"messages[{i}].content[{j}]")
                    elif isinstance(part, dict) and isinstance(part.get("text"), str):
                        check_text(part["text"], f"messages[{i}].content[{j}].text")
                    parts.append({"type": "text", "text": part} if isinstance(part, str) else part)
                    continue
                images.append(load(src, name, _detail(part, name), share))
                parts.append({"type": "image"})
            content = parts
        elif isinstance(content, str):
            check_text(content, f"messages[{i}].content")
        out.append({**message, "content": content})
    if not any(_has_content(m.get("content")) for m in out if m.get("role") == "user") and not images:
        raise EmptyPromptError("the messages hold no user text and no image: nothing to answer")
    return out, images


def check_text(text: str, where: str) -> str:
    """Refuse text llama.cpp cannot receive: UTF-8 has no encoding for a lone surrogate ("\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptEncodingError(
            f"{where} is not valid Unicode text: a lone surrogate {text[exc.start]!r} (U+{ord(text[exc.start]):04X}) at "
            f"character {exc.start}; surrogates only exist in pairs (decode the text with errors='replace' or fix "
            "its source)") from None
    return text


def user_message(prompt: str, images: Sequence[ImageInput], videos: Sequence[VideoInput] = ()) -> dict:
    """A user turn as Qwen lays it out: images, then videos, then the question."""
    parts: list[dict] = [{"type": "image", "image": img} for img in images]
    parts += [{"type": "video", "video": clip} for clip in videos]
    if prompt:
        parts.append({"type": "text", "text": prompt})
    return {"role": "user", "content": parts}


def videos_in(messages: Sequence[dict]) -> list[VideoInput]:
    """The loaded clips of template messages, in prompt order."""
    return [p["video"] for p in _parts(messages) if isinstance(p.get("video"), VideoInput)]


def media_in(messages: Sequence[dict]) -> list[ImageInput]:
    """Every bitmap of template messages for mtmd, in prompt order (a clip's frames in its place)."""
    out: list[ImageInput] = []
    for part in _parts(messages):
        if isinstance(part.get("image"), ImageInput):
            out.append(part["image"])
        elif isinstance(part.get("video"), VideoInput):
            out.extend(part["video"].frames)
    return out


def _parts(messages: Sequence[dict]) -> list[dict]:
    return [p for m in messages if isinstance(m.get("content"), list) for p in m["content"] if isinstance(p, dict)]


def _video_source(part: Any) -> Any | None:
    return _part_source(part, "video", "a data:video/... URI or a local path", "path, bytes, frame list or array")


def _image_source(part: Any) -> Any | None:
    if isinstance(part, ImageInput):
        return part
    return _part_source(part, "image", "a data URI or a local path", "path, bytes, PIL image or array")


def _part_source(part: Any, kind: str, url_hint: str, value_hint: str) -> Any | None:
    """The source of a `{kind}_url` or `{kind}` part (None for other parts)."""
    if not isinstance(part, dict):
        return None
    tag, url_key = part.get("type"), f"{kind}_url"
    article = "an" if kind[0] in "aeiou" else "a"
    if tag == url_key or (tag is None and url_key in part):
        ref = part.get(url_key)
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not url:
            raise ImageError(f"{article} {url_key} part needs {url_key}.url ({url_hint})")
        return url
    if tag == kind or (tag is None and kind in part):
        src = part.get(kind)
        if src is None:
            raise ImageError(f"{article} {kind} part needs a value under '{kind}' ({value_hint})")
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
