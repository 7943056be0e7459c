"""Boxes and points from a Qwen3-VL grounding answer, in pixels of the original image.

Qwen3-VL answers grounding prompts with JSON in a 0..1000 coordinate frame
relative to the image, whatever size the vision encoder resized it to. Model
output is not a clean JSON document: it may be fenced or bare, wrapped in prose,
a single object instead of a list, or cut off by the token limit. The parser
keeps every complete item it can find and only fails when there is none.
"""
from __future__ import annotations

import colorsys
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Union

from PIL import Image, ImageDraw, ImageFont

from edge_common.errors import EdgeError
from edge_models import chat_format

__all__ = ["Box", "GroundingError", "GroundingItem", "Point", "draw_grounding", "label_colors", "parse_grounding"]

QWEN_COORD_RANGE = chat_format().grounding_coord_range  # the default family's frame (edge_models)
_BOX_KEYS = ("bbox_2d", "bbox", "box_2d")
_POINT_KEYS = ("point_2d", "point")
_OPENER = re.compile(r"[\[{]")
_DECODER = json.JSONDecoder()
# Well separated on both white and dark photos; further labels get golden-ratio hues.
_PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (0, 190, 190),
    (240, 50, 230), (150, 200, 0), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128),
]


class GroundingError(EdgeError, ValueError):
    """The model output holds no usable grounding JSON."""


@dataclass(frozen=True)
class Box:
    """A labelled rectangle in pixels of the original image, x1 <= x2 and y1 <= y2."""

    label: str
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True)
class Point:
    """A labelled point in pixels of the original image."""

    label: str
    x: float
    y: float


GroundingItem = Union[Box, Point]


def parse_grounding(text: str, image_size: tuple[int, int], *,
                    coord_range: float = QWEN_COORD_RANGE) -> list[GroundingItem]:
    """Every complete box/point in `text`, scaled from 0..coord_range to (width, height) pixels.

    An explicit empty list ("[]": nothing found) gives []; text with no grounding
    JSON at all raises GroundingError.
    """
    width, height = _check_size(image_size)
    if not isinstance(text, str):
        raise GroundingError(f"model output must be a string, got {type(text).__name__}")
    if not coord_range > 0:
        raise GroundingError(f"coord_range must be positive, got {coord_range!r}")
    items: list[GroundingItem] = []
    saw_empty_list = False
    for value in _json_values(text):
        saw_empty_list = saw_empty_list or value == []
        items.extend(_items(value, width / coord_range, height / coord_range, width, height))
    if not items and not saw_empty_list:
        head = text.strip()[:120]
        raise GroundingError(
            f"no grounding JSON found in model output {head!r}{'...' if len(text.strip()) > 120 else ''}; "
            'expected e.g. [{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}]'
        )
    return items


def draw_grounding(image: Image.Image, items: Iterable[GroundingItem], *, width: int = 3) -> Image.Image:
    """A copy of `image` with each box/point and its label drawn; one colour per label."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise GroundingError(f"width must be a positive int (line width in pixels), got {width!r}")
    items = list(items)
    for item in items:
        if not isinstance(item, (Box, Point)):
            # a plain TypeError: a caller's type error, as Python raises it
            raise TypeError(f"draw_grounding takes Box and Point items, got {type(item).__name__}")
    canvas = image.copy() if image.mode in ("RGB", "RGBA") else image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    font = _font(max(10, min(canvas.size) // 40))
    colors = label_colors(items)
    for item in items:
        color = colors[item.label]
        if isinstance(item, Box):
            draw.rectangle((round(item.x1), round(item.y1), round(item.x2), round(item.y2)), outline=color, width=width)
            anchor = (round(item.x1), round(item.y1))
        else:
            r = max(3, 2 * width)
            x, y = round(item.x), round(item.y)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=color, outline=(255, 255, 255), width=max(1, width // 2))
            anchor = (x + r + 2, y - r)
        if item.label:
            _draw_label(draw, canvas.size, anchor, item.label, color, font)
    return canvas


def label_colors(items: Iterable[GroundingItem]) -> dict[str, tuple[int, int, int]]:
    """Colours by label in order of first appearance, so the same answer always looks the same."""
    colors: dict[str, tuple[int, int, int]] = {}
    for item in items:
        if item.label not in colors:
            colors[item.label] = _nth_color(len(colors))
    return colors


# --- parsing -------------------------------------------------------------


def _check_size(image_size: Any) -> tuple[int, int]:
    try:
        width, height = image_size
    except (TypeError, ValueError):
        raise GroundingError(f"image_size must be (width, height), got {image_size!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
        raise GroundingError(f"image_size must be two positive ints (width, height), got {image_size!r}")
    return width, height


def _json_values(text: str) -> Iterator[Any]:
    """Each JSON array/object in text, left to right; a truncated array yields its complete items."""
    pos = 0
    while (m := _OPENER.search(text, pos)) is not None:
        start = m.start()
        try:
            value, pos = _DECODER.raw_decode(text, start)
            yield value
            continue
        except json.JSONDecodeError:
            pass
        if text[start] == "[":
            salvaged, end = _salvage_list(text, start)
            if salvaged:
                yield salvaged
                pos = end
                continue
        pos = start + 1


def _salvage_list(text: str, start: int) -> tuple[list[Any], int]:
    """The leading complete elements of a broken or cut-off array, and where they end."""
    items: list[Any] = []
    pos = start + 1
    while True:
        pos = _skip_ws(text, pos)
        try:
            value, pos = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            return items, pos
        items.append(value)
        pos = _skip_ws(text, pos)
        if not text.startswith(",", pos):
            return items, pos
        pos += 1


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _items(value: Any, sx: float, sy: float, width: int, height: int) -> Iterator[GroundingItem]:
    if isinstance(value, list):
        for element in value:
            yield from _items(element, sx, sy, width, height)
        return
    if not isinstance(value, dict):
        return
    label = value.get("label", "")
    label = "" if label is None else str(label)
    box = _numbers(next((value[k] for k in _BOX_KEYS if k in value), None), 4)
    if box is not None:
        x1, x2 = sorted((_clamp(box[0] * sx, width), _clamp(box[2] * sx, width)))
        y1, y2 = sorted((_clamp(box[1] * sy, height), _clamp(box[3] * sy, height)))
        yield Box(label, x1, y1, x2, y2)
        return
    point = _numbers(next((value[k] for k in _POINT_KEYS if k in value), None), 2)
    if point is not None:
        yield Point(label, _clamp(point[0] * sx, width), _clamp(point[1] * sy, height))


def _numbers(raw: Any, n: int) -> list[float] | None:
    if not isinstance(raw, (list, tuple)) or len(raw) != n:
        return None
    out = []
    for v in raw:
        if isinstance(v, bool):
            return None
        try:
            f = float(v)
        except (TypeError, ValueError):
            return None
        if f != f or f in (float("inf"), float("-inf")):
            return None
        out.append(f)
    return out


def _clamp(v: float, hi: int) -> float:
    return min(max(v, 0.0), float(hi))


# --- drawing -------------------------------------------------------------


def _nth_color(n: int) -> tuple[int, int, int]:
    if n < len(_PALETTE):
        return _PALETTE[n]
    r, g, b = colorsys.hsv_to_rgb((n * 0.618033988749895) % 1.0, 0.85, 0.9)
    return round(r * 255), round(g * 255), round(b * 255)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size)
    except (OSError, ValueError, TypeError, ImportError):  # no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _draw_label(draw: ImageDraw.ImageDraw, size: tuple[int, int], anchor: tuple[int, int], label: str,
                color: tuple[int, int, int], font: Any) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    tw, th = right - left + 4, bottom - top + 4
    x = min(max(anchor[0], 0), max(size[0] - tw, 0))
    y = anchor[1] - th if anchor[1] - th >= 0 else anchor[1]
    y = min(max(y, 0), max(size[1] - th, 0))
    draw.rectangle((x, y, x + tw, y + th), fill=color)
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    draw.text((x + 2 - left, y + 2 - top), label, fill=(0, 0, 0) if luminance > 150 else (255, 255, 255), font=font)
