"""edge_runtime.vision.images: every source kind and colour mode becomes 8-bit RGB; bad input names itself."""
from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_runtime.vision.images import ImageError, ImageLimits, image_digest, load_image, to_rgb_array

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def two_halves(w: int = 40, h: int = 20) -> Image.Image:
    """Left half red, right half blue: shows which way an image was turned."""
    img = Image.new("RGB", (w, h), RED)
    img.paste(BLUE, (w // 2, 0, w, h))
    return img


def near(pixel, expected, tol: int = 12) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


# --- formats and colour modes ---------------------------------------------


def test_jpeg_exif_orientation_6_rotates_and_swaps_dimensions(tmp_path: Path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "phone.jpg"
    two_halves(40, 20).save(path, "JPEG", quality=95, exif=exif)

    img = load_image(path)

    assert img.mode == "RGB"
    assert img.size == (20, 40)
    # Turned clockwise, the red left half ends up on top.
    assert near(img.getpixel((10, 5)), RED, 40)
    assert near(img.getpixel((10, 35)), BLUE, 40)


def test_png_rgba_is_flattened_onto_white(tmp_path: Path):
    rgba = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    path = tmp_path / "alpha.png"
    rgba.save(path)

    img = load_image(str(path))

    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == WHITE
    assert img.getpixel((1, 0)) == RED
    assert near(img.getpixel((2, 0)), (127, 127, 127), 2)


def test_la_png_is_flattened_onto_white(tmp_path: Path):
    la = Image.new("LA", (3, 3), (0, 0))
    la.putpixel((1, 1), (40, 255))
    path = tmp_path / "la.png"
    la.save(path)

    img = load_image(path)

    assert img.getpixel((0, 0)) == WHITE
    assert img.getpixel((1, 1)) == (40, 40, 40)


def test_palette_png_with_transparent_index_turns_white(tmp_path: Path):
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0] + [0, 200, 0] + [0, 0, 0] * 254)
    pal.putpixel((3, 3), 1)
    path = tmp_path / "pal.png"
    pal.save(path, transparency=0)
    with Image.open(path) as raw:
        assert raw.mode == "P"

    img = load_image(path)

    assert img.getpixel((0, 0)) == WHITE  # index 0 is transparent, not black
    assert img.getpixel((3, 3)) == (0, 200, 0)


def test_webp_lossless_keeps_pixels():
    data = encode(two_halves(), "WEBP", lossless=True)
    img = load_image(data)
    assert img.size == (40, 20)
    assert img.getpixel((0, 0)) == RED and img.getpixel((39, 19)) == BLUE


def test_bmp_keeps_pixels(tmp_path: Path):
    path = tmp_path / "x.bmp"
    two_halves().save(path)
    img = load_image(path)
    assert np.array_equal(np.asarray(img), np.asarray(two_halves()))


def test_tiff_16bit_gray_is_scaled_not_clipped(tmp_path: Path):
    values = np.array([[0, 1000, 32896, 40000, 65535, 257]], dtype=np.uint16).repeat(2, axis=0)
    path = tmp_path / "deep.tif"
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode == "I;16"

    arr = np.asarray(load_image(path))

    assert arr.shape == (2, 6, 3)
    assert list(arr[0, :, 0]) == [0, 4, 128, 156, 255, 1]  # PIL's convert("L") would give 255 for 1000..65535
    assert np.array_equal(arr[..., 0], arr[..., 2])


def test_png_16bit_gray_is_scaled(tmp_path: Path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((3, 3), 20000, dtype=np.uint16)).save(path)
    assert load_image(path).getpixel((1, 1)) == (78, 78, 78)


def test_mode_i_and_f_images_are_scaled():
    as_i = Image.fromarray(np.full((2, 2), 65535, dtype=np.int32))
    assert as_i.mode == "I"
    assert load_image(as_i).getpixel((0, 0)) == WHITE
    as_f = Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32))
    assert as_f.mode == "F"
    assert load_image(as_f).getpixel((0, 0)) == (128, 128, 128)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2

    img = load_image(data)

    assert img.mode == "RGB"
    assert img.getpixel((4, 4)) == RED


def test_cmyk_jpeg_becomes_rgb():
    cyan = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    img = load_image(encode(cyan, "JPEG", quality=95))
    assert img.mode == "RGB"
    assert near(img.getpixel((8, 8)), (0, 255, 255))


def test_grayscale_and_bilevel(tmp_path: Path):
    path = tmp_path / "gray.png"
    Image.new("L", (5, 5), 77).save(path)
    assert load_image(path).getpixel((2, 2)) == (77, 77, 77)
    bilevel = Image.new("1", (4, 4), 1)
    assert load_image(bilevel).getpixel((0, 0)) == WHITE


def test_lab_tiff_is_colour_transformed(tmp_path: Path):
    path = tmp_path / "lab.tif"
    Image.new("LAB", (4, 4), (128, 128, 128)).save(path)  # L*=50, a*=b*=0: neutral mid grey
    pixel = load_image(path).getpixel((1, 1))
    assert near(pixel, (119, 119, 119), 3)  # not (128, 0, 0)-ish channel reinterpretation
    assert max(pixel) - min(pixel) <= 2


def test_truncated_file_opened_lazily_by_caller(tmp_path: Path):
    path = tmp_path / "cut.png"
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as lazy:
        with pytest.raises(ImageError, match=r"^image \(PIL image\): cannot decode"):
            load_image(lazy)


def test_pil_input_is_not_modified():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 0))
    img = load_image(rgba)
    assert img.getpixel((0, 0)) == WHITE
    assert rgba.mode == "RGBA" and rgba.getpixel((0, 0)) == (0, 0, 255, 0)
    assert img is not rgba


# --- numpy arrays ------------------------------------------------------------


def test_numpy_uint8_gray_rgb_rgba():
    gray = np.full((3, 4), 9, dtype=np.uint8)
    assert load_image(gray).size == (4, 3)
    assert load_image(gray).getpixel((0, 0)) == (9, 9, 9)

    rgb = np.zeros((3, 4, 3), dtype=np.uint8)
    rgb[..., 1] = 200
    assert load_image(rgb).getpixel((3, 2)) == (0, 200, 0)

    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)
    img = load_image(rgba)
    assert img.getpixel((0, 0)) == RED
    assert img.getpixel((1, 0)) == WHITE


def test_numpy_single_channel_and_non_contiguous():
    one = np.full((3, 3, 1), 50, dtype=np.uint8)
    assert load_image(one).getpixel((0, 0)) == (50, 50, 50)
    rgb = np.zeros((4, 6, 3), dtype=np.uint8)
    rgb[:, :, 0] = np.arange(6, dtype=np.uint8)
    view = rgb[:, ::2]  # strided
    assert not view.flags["C_CONTIGUOUS"]
    assert [load_image(view).getpixel((x, 0))[0] for x in range(3)] == [0, 2, 4]


def test_numpy_uint16_is_scaled():
    arr = np.array([[0, 257, 65535]], dtype=np.uint16).repeat(2, axis=0)
    assert [load_image(arr).getpixel((x, 0))[0] for x in range(3)] == [0, 1, 255]


def test_numpy_float_in_unit_range():
    arr = np.array([[0.0, 0.5, 1.0]], dtype=np.float32).repeat(2, axis=0)
    assert [load_image(arr).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    rgb = np.ones((2, 2, 3), dtype=np.float64) * 0.2
    assert load_image(rgb).getpixel((0, 0)) == (51, 51, 51)


def test_numpy_bad_values_shapes_and_dtypes():
    with pytest.raises(ImageError, match=r"values in 0\.\.255.*expected 0\.\.1"):
        load_image(np.array([[0.0, 255.0], [3.0, 4.0]]))
    with pytest.raises(ImageError, match="NaN"):
        load_image(np.full((2, 2), np.nan))
    with pytest.raises(ImageError, match=r"frame \(numpy array\): dtype int64 is not supported"):
        load_image(np.zeros((2, 2), dtype=np.int64), name="frame")
    with pytest.raises(ImageError, match=r"shape \(2, 2, 2\)"):
        load_image(np.zeros((2, 2, 2), dtype=np.uint8))


# --- other sources -----------------------------------------------------------


def test_bytes_bytearray_memoryview_give_same_image():
    data = encode(two_halves(), "PNG")
    images = [load_image(data), load_image(bytearray(data)), load_image(memoryview(data))]
    assert len({image_digest(img) for img in images}) == 1
    assert images[0].size == (40, 20)


def test_data_uri():
    data = encode(two_halves(), "PNG")
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    img = load_image(uri)
    assert img.size == (40, 20) and img.getpixel((0, 0)) == RED
    # Line-wrapped and unpadded payloads still decode.
    wrapped = "data:image/png;base64," + "\n".join(base64.b64encode(data).decode().rstrip("="))
    assert image_digest(load_image(wrapped)) == image_digest(img)


def test_data_uri_errors():
    with pytest.raises(ImageError, match=r"\(data URI\): data URI media type is 'text/plain'"):
        load_image("data:text/plain;base64,aGVsbG8=")
    with pytest.raises(ImageError, match="invalid base64"):
        load_image("data:image/png;base64,@@@@")
    with pytest.raises(ImageError, match="malformed data URI"):
        load_image("data:image/png;base64")


def test_file_uri_and_remote_url(tmp_path: Path):
    path = tmp_path / "a b.png"
    two_halves().save(path)
    assert load_image(path.as_uri()).size == (40, 20)
    with pytest.raises(ImageError, match="remote URLs are not fetched"):
        load_image("https://example.com/cat.jpg")


# --- errors ------------------------------------------------------------------


def test_missing_path_names_the_path(tmp_path: Path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match="file not found") as info:
        load_image(missing)
    assert str(missing) in str(info.value)


def test_nul_byte_in_path_is_an_image_error():
    with pytest.raises(ImageError, match="cannot read file"):
        load_image("bad\x00name.png")


def test_directory_is_not_an_image(tmp_path: Path):
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path)


def test_corrupt_bytes_name_the_input():
    with pytest.raises(ImageError, match=r"^image 2 \(bytes\): not a supported image") as info:
        load_image(b"this is not an image", name="image 2")
    assert "JPEG" in str(info.value)
    with pytest.raises(ImageError, match=r"\(bytes\): no data"):
        load_image(b"")


def test_truncated_png_is_an_image_error():
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(data[: len(data) // 2])


def test_unsupported_format_is_refused():
    ppm = encode(two_halves(), "PPM")
    assert Image.open(io.BytesIO(ppm)).format == "PPM"  # PIL itself would open it
    with pytest.raises(ImageError, match="not a supported image"):
        load_image(ppm)


def test_decompression_bomb_is_refused_and_pil_limit_restored():
    before = Image.MAX_IMAGE_PIXELS
    data = encode(Image.new("RGB", (200, 200)), "PNG")  # a few hundred bytes, 40k pixels
    with pytest.raises(ImageError, match="max_pixels=1000"):
        load_image(data, limits=ImageLimits(max_pixels=1000))
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(encode(Image.new("RGB", (200, 200)), "PNG"), limits=ImageLimits(max_pixels=10000))
    assert Image.MAX_IMAGE_PIXELS == before
    assert load_image(data).size == (200, 200)  # the default limit admits it


def test_pixel_limit_applies_to_arrays_and_pil_images():
    with pytest.raises(ImageError, match="max_pixels=100"):
        load_image(np.zeros((20, 20), dtype=np.uint8), limits=ImageLimits(max_pixels=100))
    with pytest.raises(ImageError, match="max_pixels=100"):
        load_image(Image.new("RGB", (20, 20)), limits=ImageLimits(max_pixels=100))


def test_too_large_side_bytes_and_too_small(tmp_path: Path):
    with pytest.raises(ImageError, match=r"60x10 has a side over ImageLimits.max_side=50"):
        load_image(encode(Image.new("RGB", (60, 10)), "PNG"), limits=ImageLimits(max_side=50))
    path = tmp_path / "big.bmp"
    Image.new("RGB", (20, 20)).save(path)
    with pytest.raises(ImageError, match="exceeds ImageLimits.max_bytes=100") as info:
        load_image(path, limits=ImageLimits(max_bytes=100))
    assert "big.bmp" in str(info.value)
    with pytest.raises(ImageError, match="under ImageLimits.min_side=2"):
        load_image(Image.new("RGB", (1, 5)))


def test_unsupported_type_names_it():
    with pytest.raises(ImageError, match="unsupported image source type int"):
        load_image(42)  # type: ignore[arg-type]
    with pytest.raises(ImageError, match=r"^picture \(dict\)"):
        load_image({"url": "x"}, name="picture")  # type: ignore[arg-type]


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_pixels must be a positive int"):
        ImageLimits(max_pixels=0)
    with pytest.raises(ValueError, match="min_side"):
        ImageLimits(min_side=100, max_side=50)


def test_corrupt_exif_does_not_reject_a_photo():
    data = bytearray(encode(two_halves(), "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\xff"))
    img = load_image(bytes(data))
    assert img.size == (40, 20)


# --- digest and array ---------------------------------------------------------


def test_digest_same_pixels_same_digest(tmp_path: Path):
    png, bmp = tmp_path / "a.png", tmp_path / "a.bmp"
    two_halves().save(png)
    two_halves().save(bmp)
    digest = image_digest(load_image(png))
    assert digest == image_digest(load_image(bmp))
    assert digest == image_digest(load_image(np.asarray(two_halves())))
    assert re.fullmatch(r"[0-9a-f]{64}", digest)  # sha256 hex
    assert digest != image_digest(load_image(np.asarray(two_halves())[:, ::-1].copy()))  # other pixels, other digest


def test_digest_differs_for_different_pixels_size_and_mode():
    a = two_halves()
    b = a.copy()
    b.putpixel((0, 0), (254, 0, 0))
    assert image_digest(a) != image_digest(b)
    flat = np.zeros((2, 8), dtype=np.uint8)
    assert image_digest(Image.fromarray(flat)) != image_digest(Image.fromarray(flat.reshape(8, 2)))
    assert image_digest(Image.new("L", (4, 4))) != image_digest(Image.new("P", (4, 4)))


def test_to_rgb_array_layout():
    arr = to_rgb_array(load_image(two_halves(6, 4)))
    assert arr.shape == (4, 6, 3) and arr.dtype == np.uint8
    assert arr.flags["C_CONTIGUOUS"]
    assert tuple(arr[0, 0]) == RED and tuple(arr[3, 5]) == BLUE
    from_rgba = to_rgb_array(Image.new("RGBA", (3, 2), (0, 0, 0, 0)))
    assert from_rgba.shape == (2, 3, 3) and (from_rgba == 255).all()
