"""edge_runtime.chat.grounding: messy model output -> boxes/points in pixels, and drawing them."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edge_runtime.chat.grounding import Box, GroundingError, Point, draw_grounding, label_colors, parse_grounding

SQUARE = (1000, 1000)  # 1 unit = 1 pixel: results read as the model wrote them


def test_fenced_json_list():
    text = (
        "```json\n"
        '[\n  {"bbox_2d": [10, 20, 300, 400], "label": "cat"},\n'
        '  {"bbox_2d": [500, 500, 600, 700], "label": "dog"}\n]\n'
        "```"
    )
    assert parse_grounding(text, SQUARE) == [Box("cat", 10, 20, 300, 400), Box("dog", 500, 500, 600, 700)]


def test_bare_list():
    assert parse_grounding('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}]', SQUARE) == [Box("a", 1, 2, 3, 4)]


def test_single_object():
    assert parse_grounding('{"bbox_2d": [100, 100, 200, 250], "label": "mug"}', SQUARE) == [
        Box("mug", 100, 100, 200, 250)
    ]


def test_prose_around_json_and_trailing_junk():
    text = (
        "Sure! Here is the cup [as requested]:\n"
        '```json\n[{"bbox_2d": [100, 200, 300, 400], "label": "cup"}]\n```\n'
        "Let me know if you need anything else. }"
    )
    assert parse_grounding(text, SQUARE) == [Box("cup", 100, 200, 300, 400)]


def test_several_objects_one_per_line():
    text = '{"bbox_2d": [0, 0, 10, 10], "label": "a"}\n{"point_2d": [5, 6], "label": "b"}'
    assert parse_grounding(text, SQUARE) == [Box("a", 0, 0, 10, 10), Point("b", 5, 6)]


def test_truncated_list_keeps_complete_items():
    text = (
        '```json\n[\n  {"bbox_2d": [10, 10, 20, 20], "label": "a"},\n'
        '  {"bbox_2d": [30, 30, 40, 40], "label": "b"},\n'
        '  {"bbox_2d": [50, 50, 6'
    )
    assert parse_grounding(text, SQUARE) == [Box("a", 10, 10, 20, 20), Box("b", 30, 30, 40, 40)]


def test_trailing_comma_list():
    assert parse_grounding('[{"point_2d": [1, 2], "label": "p"},]', SQUARE) == [Point("p", 1, 2)]


def test_points_and_mixed_items():
    text = '[{"point_2d": [250, 750], "label": "nose"}, {"bbox_2d": [0, 0, 500, 500], "label": "face"}]'
    assert parse_grounding(text, SQUARE) == [Point("nose", 250, 750), Box("face", 0, 0, 500, 500)]


def test_scaling_on_non_square_image():
    # 0..1000 maps to 0..width horizontally and 0..height vertically.
    items = parse_grounding(
        '[{"bbox_2d": [100, 250, 500, 1000], "label": "x"}, {"point_2d": [500, 500], "label": "c"}]', (640, 480)
    )
    assert items == [Box("x", 64.0, 120.0, 320.0, 480.0), Point("c", 320.0, 240.0)]


def test_clamping_and_corner_order():
    items = parse_grounding(
        '[{"bbox_2d": [900, 1200, -50, 300], "label": "x"}, {"point_2d": [1500, -3], "label": "p"}]', (200, 100)
    )
    assert items == [Box("x", 0.0, 30.0, 180.0, 100.0), Point("p", 200.0, 0.0)]
    box = items[0]
    assert box.x1 <= box.x2 and box.y1 <= box.y2


def test_label_defaults_and_numeric_strings_and_bad_items_skipped():
    text = '[{"bbox_2d": ["10", 20, 30.5, 40]}, {"bbox_2d": [1, 2, 3]}, {"point_2d": [true, 2]}, {"label": "none"}]'
    assert parse_grounding(text, SQUARE) == [Box("", 10, 20, 30.5, 40)]


def test_empty_list_means_nothing_found():
    assert parse_grounding("```json\n[]\n```", SQUARE) == []


def test_custom_coordinate_range():
    items = parse_grounding('{"bbox_2d": [0, 0, 1, 0.5], "label": "half"}', (300, 200), coord_range=1.0)
    assert items == [Box("half", 0, 0, 300, 100)]


def test_nothing_parseable_quotes_the_text():
    with pytest.raises(GroundingError, match=r"no grounding JSON found in model output 'I cannot see a cat"):
        parse_grounding("I cannot see a cat in this image [sorry].", SQUARE)
    with pytest.raises(GroundingError, match=r"'\{\"bbox_2d\": \[1, 2"):
        parse_grounding('{"bbox_2d": [1, 2', SQUARE)
    with pytest.raises(GroundingError, match=r"\.\.\.; expected"):
        parse_grounding("x" * 500, SQUARE)


def test_bad_image_size():
    with pytest.raises(ValueError, match="image_size"):
        parse_grounding("[]", (0, 10))
    with pytest.raises(ValueError, match="image_size"):
        parse_grounding("[]", 640)  # type: ignore[arg-type]


# --- drawing ----------------------------------------------------------------------


def test_draw_leaves_original_unchanged_and_marks_the_copy():
    image = Image.new("RGB", (200, 120), (255, 255, 255))
    before = np.asarray(image).copy()
    items = [Box("cat", 20, 30, 120, 100), Point("nose", 150, 60)]

    out = draw_grounding(image, items, width=3)

    assert np.array_equal(np.asarray(image), before)
    assert out is not image and out.size == image.size
    colors = label_colors(items)
    assert out.getpixel((20, 65)) == colors["cat"]  # left edge of the box
    assert out.getpixel((119, 65)) == colors["cat"]  # right edge (inside the line width)
    assert out.getpixel((70, 65)) == (255, 255, 255)  # box interior untouched
    assert out.getpixel((150, 60)) == colors["nose"]  # point centre
    changed = np.any(np.asarray(out) != before, axis=2)
    assert changed[:30, 20:80].any()  # the label sits above the box


def test_distinct_colors_per_label_and_same_color_for_same_label():
    items = [Box("a", 0, 0, 10, 10), Box("b", 20, 0, 30, 10), Box("a", 40, 0, 50, 10)]
    colors = label_colors(items)
    assert list(colors) == ["a", "b"] and colors["a"] != colors["b"]
    many = label_colors([Point(str(i), 0, 0) for i in range(40)])
    assert len(set(many.values())) == 40

    out = draw_grounding(Image.new("RGB", (60, 40), (255, 255, 255)), items, width=1)
    assert out.getpixel((0, 5)) == out.getpixel((40, 5)) == colors["a"]
    assert out.getpixel((20, 5)) == colors["b"]


def test_draw_on_gray_image_and_parsed_items():
    gray = Image.new("L", (320, 240), 128)
    items = parse_grounding('[{"bbox_2d": [0, 0, 1000, 1000], "label": "all"}]', gray.size)
    out = draw_grounding(gray, items)
    assert gray.mode == "L" and out.mode == "RGB"
    assert out.getpixel((0, 120)) == label_colors(items)["all"]


def test_draw_rejects_bad_width_and_items():
    img = Image.new("RGB", (10, 10))
    with pytest.raises(ValueError, match="width"):
        draw_grounding(img, [], width=0)
    with pytest.raises(TypeError, match="Box and Point"):
        draw_grounding(img, [(1, 2, 3, 4)])  # type: ignore[list-item]
