"""Turn whatever a caller calls "an image" into one RGB PIL image, safely.

The vision encoder only ever sees 8-bit RGB, so every source kind (path, bytes,
data URI, PIL image, numpy array) and every colour mode ends up here in the same
shape. Images come from untrusted requests: sizes are checked before pixels are
decoded, and the decoders are limited to the formats a camera or browser makes.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import struct
import threading
import urllib.parse
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Union

import numpy as np
from PIL import Image, ImageOps

from edge_common.errors import EdgeError

from edge_runtime.vision.resize import draft_for, resize_to

__all__ = [
    "ImageError",
    "ImageLimits",
    "ImageSource",
    "SUPPORTED_FORMATS",
    "data_uri_bytes",
    "image_digest",
    "load_image",
    "to_rgb_array",
]

# Others (EPS runs Ghostscript, ICO/PSD/...) are attack surface no photo needs. Phone
# JPEGs with a preview picture (MPO) come in through the JPEG opener.
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")

ImageSource = Union[str, Path, bytes, bytearray, memoryview, Image.Image, np.ndarray]
# (width, height) of the upright image -> (width, height) it should have: the resize
# is known before decoding, so a large JPEG can decode at a reduced scale.
SizeRule = Callable[[tuple[int, int]], tuple[int, int]]

_DATA_URI = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(?:;[^,]*)?),(?P<payload>.*)$", re.DOTALL | re.IGNORECASE)
_WHITE = (255, 255, 255)
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
# PIL's bomb limit is process-wide state: set it only while holding this lock.
_PIL_LIMIT_LOCK = threading.Lock()
# What PIL's decoders raise on corrupt or truncated data (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError, TypeError, MemoryError)


class ImageError(EdgeError, ValueError):
    """An image could not be used; the message names the input and the fix."""


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on an input image; the defaults admit any real photo or screenshot.

    max_pixels guards against decompression bombs (a few KB of PNG that inflate
    to gigabytes); min_side rejects images too small to hold one vision patch.
    """

    max_pixels: int = 64_000_000
    max_side: int = 16384
    max_bytes: int = 64 * 1024 * 1024
    min_side: int = 2

    def __post_init__(self) -> None:
        for field in ("max_pixels", "max_side", "max_bytes", "min_side"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ImageError(f"ImageLimits.{field} must be a positive int, got {value!r}")
        if self.min_side > self.max_side:
            raise ImageError(
                f"ImageLimits.min_side ({self.min_side}) is larger than max_side ({self.max_side})"
            )


def load_image(
    src: ImageSource, *, name: str | None = None, limits: ImageLimits = ImageLimits(), fit: SizeRule | None = None
) -> Image.Image:
    """Load `src` as an RGB image, EXIF orientation applied, alpha flattened onto white.

    `name` labels the input in error messages (e.g. "image 2"); the source kind
    is appended, so errors read "image 2 (bytes): ...". With `fit`, the image is
    resized (PIL bicubic) to the size it returns; a JPEG is decoded at a reduced
    scale when that size allows (see resize.draft_for).
    """
    if isinstance(src, Image.Image):
        label = _label(name, "PIL image")
        with _pil_pixel_limit(label, limits):
            _check_size(label, src.size, limits)
            _load_pixels(label, src)
            img = _exif_upright(src)
        return _finish(label, _pil_to_rgb(label, img), limits, fit)
    if isinstance(src, np.ndarray):
        label = _label(name, "numpy array")
        return _finish(label, _array_to_rgb(label, src, limits), limits, fit)
    if isinstance(src, (bytes, bytearray, memoryview)):
        label = _label(name, "bytes")
        data = src.tobytes() if isinstance(src, memoryview) else bytes(src)
        return _decode(label, data, limits, fit)
    if isinstance(src, Path):
        return _load_path(src, name, limits, fit)
    if isinstance(src, str):
        if src[:5].lower() == "data:":
            label = _label(name, "data URI")
            return _decode(label, data_uri_bytes(label, src, limits.max_bytes), limits, fit)
        if src[:7].lower() == "file://":
            return _load_path(Path(urllib.parse.unquote(urllib.parse.urlparse(src).path)), name, limits, fit)
        if re.match(r"^[a-z][a-z0-9+.-]*://", src, re.IGNORECASE):
            raise ImageError(
                f"{_label(name, 'URL')}: remote URLs are not fetched ({src[:60]!r}); "
                "download the image and pass its bytes or a local path"
            )
        return _load_path(Path(src), name, limits, fit)
    raise ImageError(
        f"{_label(name, type(src).__name__)}: unsupported image source type {type(src).__name__}; "
        "pass a path, bytes, a data:image/...;base64 URI, a PIL image or a numpy array"
    )


def image_digest(img: Image.Image) -> str:
    """A content id for caches: equal pixels give equal ids, whatever file they came from."""
    h = hashlib.sha256()
    h.update(f"{img.mode}:{img.size[0]}x{img.size[1]}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """HxWx3 uint8, C-contiguous: the layout llama.cpp's mtmd bitmap copies from."""
    rgb = img if img.mode == "RGB" else _pil_to_rgb("image", img)
    return np.array(rgb, dtype=np.uint8, order="C")


# --- sources -------------------------------------------------------------


def _label(name: str | None, kind: str) -> str:
    return f"{name or 'image'} ({kind})"


def _load_path(path: Path, name: str | None, limits: ImageLimits, fit: SizeRule | None = None) -> Image.Image:
    path = path.expanduser()
    label = _label(name, f"file '{path}'")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError(f"{label}: file not found; check the path") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ImageError(f"{label}: cannot read file ({getattr(exc, 'strerror', None) or exc})") from None
    if not path.is_file():
        raise ImageError(f"{label}: not a regular file; pass the path of an image file")
    _check_bytes(label, size, limits.max_bytes)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{label}: cannot read file ({exc.strerror or exc})") from None
    return _decode(label, data, limits, fit)


def data_uri_bytes(
    label: str, uri: str, max_bytes: int, media: str = "image", error: type[ImageError] = ImageError,
    limit: str = "ImageLimits.max_bytes",
) -> bytes:
    """The payload of a `data:{media}/...` URI, its size checked before it is decoded."""
    m = _DATA_URI.match(uri)
    if m is None:
        raise error(f"{label}: malformed data URI (no ',' separator); expected data:{media}/...;base64,...")
    mime = m["mime"].strip().lower()
    if mime and not mime.startswith(f"{media}/"):
        raise error(f"{label}: data URI media type is {mime!r}, not {media}/*")
    payload = m["payload"]
    if "base64" not in m["params"].lower():
        data = urllib.parse.unquote_to_bytes(payload)
        _check_bytes(label, len(data), max_bytes, error, limit)
        return data
    payload = re.sub(r"\s+", "", payload)
    # Check the decoded size before decoding: base64 is 4 chars per 3 bytes.
    _check_bytes(label, len(payload) * 3 // 4, max_bytes, error, limit)
    try:
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise error(f"{label}: invalid base64 payload ({exc})") from None


# --- decoding ------------------------------------------------------------


def _decode(label: str, data: bytes, limits: ImageLimits, fit: SizeRule | None = None) -> Image.Image:
    _check_bytes(label, len(data), limits.max_bytes)
    if not data:
        raise ImageError(f"{label}: no data (0 bytes)")
    with _pil_pixel_limit(label, limits):
        try:
            img = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
        except Image.UnidentifiedImageError:
            raise ImageError(
                f"{label}: not a supported image (data starts with {data[:8]!r}); "
                f"supported formats are {', '.join(SUPPORTED_FORMATS)}"
            ) from None
        except _DECODE_ERRORS as exc:
            raise ImageError(f"{label}: cannot decode image data ({exc}); the file is corrupt or truncated") from None
        _check_size(label, img.size, limits)
        original = _upright_size(img)
        target = _fit(label, fit, original) if fit is not None else None
        if target is not None:
            _draft(img, target, original)
        _load_pixels(label, img)  # the first frame of an animation: Image.open selected it
        img = _exif_upright(img)
    return _finish(label, _pil_to_rgb(label, img), limits, fit, target)


def _load_pixels(label: str, img: Image.Image) -> None:
    try:
        img.load()
    except _DECODE_ERRORS as exc:
        raise ImageError(f"{label}: cannot decode image data ({exc}); the file is corrupt or truncated") from None


@contextmanager
def _pil_pixel_limit(label: str, limits: ImageLimits) -> Iterator[None]:
    """Apply limits.max_pixels to PIL's own bomb checks, which also run inside decoders."""
    with _PIL_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = limits.max_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                # PIL's metadata complaints ("Corrupt EXIF data") about a decodable file.
                warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
                yield
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(
                f"{label}: too many pixels, possible decompression bomb ({exc}); "
                f"the limit is ImageLimits.max_pixels={limits.max_pixels}"
            ) from None
        finally:
            Image.MAX_IMAGE_PIXELS = previous


_SWAPPED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that turn the picture by 90 degrees


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except (SyntaxError, ValueError, TypeError, KeyError, struct.error, OSError):
        return 1


def _upright_size(img: Image.Image) -> tuple[int, int]:
    """The size after EXIF orientation, read from the header (nothing decoded)."""
    w, h = img.size
    return (h, w) if _exif_orientation(img) in _SWAPPED_ORIENTATIONS else (w, h)


def _draft(img: Image.Image, target: tuple[int, int], upright: tuple[int, int]) -> None:
    """draft_for in the file's own orientation."""
    stored = target if upright == img.size else (target[1], target[0])
    draft_for(img, stored)


def _exif_upright(img: Image.Image) -> Image.Image:
    """Rotate as the camera meant; a broken EXIF block is no reason to refuse a photo."""
    try:
        return ImageOps.exif_transpose(img)
    except (SyntaxError, ValueError, TypeError, KeyError, struct.error, OSError):
        return img


def _check_bytes(
    label: str, n: int, max_bytes: int, error: type[ImageError] = ImageError, limit: str = "ImageLimits.max_bytes"
) -> None:
    if n > max_bytes:
        raise error(f"{label}: {n} bytes exceeds {limit}={max_bytes}")


def _check_size(label: str, size: tuple[int, int], limits: ImageLimits) -> None:
    w, h = size
    if max(w, h) > limits.max_side:
        raise ImageError(f"{label}: {w}x{h} has a side over ImageLimits.max_side={limits.max_side}; downscale it")
    if w * h > limits.max_pixels:
        raise ImageError(
            f"{label}: {w}x{h} = {w * h} pixels exceeds ImageLimits.max_pixels={limits.max_pixels}; downscale it"
        )
    if min(w, h) < limits.min_side:
        raise ImageError(f"{label}: {w}x{h} has a side under ImageLimits.min_side={limits.min_side}")


def _finish(
    label: str, img: Image.Image, limits: ImageLimits, fit: SizeRule | None = None,
    target: tuple[int, int] | None = None,
) -> Image.Image:
    if target is None:
        _check_size(label, img.size, limits)
        if fit is None:
            return img
        target = _fit(label, fit, img.size)
    return resize_to(img, target)


def _fit(label: str, fit: SizeRule, size: tuple[int, int]) -> tuple[int, int]:
    try:
        return fit(size)
    except ValueError as exc:  # smart_resize: an aspect ratio over 200
        raise ImageError(f"{label}: {size[0]}x{size[1]}: {exc}; crop the image") from None


# --- colour --------------------------------------------------------------


def _pil_to_rgb(label: str, img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: alpha and transparency keys onto white, high bit depths rescaled."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _SIXTEEN_BIT_MODES:
        return _gray_array_to_rgb(_scale_16bit(np.asarray(img)))
    if mode == "I":
        return _gray_array_to_rgb(_scale_int32(np.asarray(img)))
    if mode == "F":
        return _gray_array_to_rgb(_scale_float(label, np.asarray(img), "mode F image"))
    try:
        if mode == "LAB":
            return _lab_to_rgb(img)
        if mode in _ALPHA_MODES or "transparency" in img.info:
            return _flatten(img.convert("RGBA"))
        return img.convert("RGB")
    except (ValueError, OSError, ImportError) as exc:
        raise ImageError(f"{label}: cannot convert colour mode {mode} to RGB ({exc}); save it as RGB") from None


def _lab_to_rgb(img: Image.Image) -> Image.Image:
    """CIELab needs a colour transform: PIL's convert() would reinterpret the channels as RGB."""
    from PIL import ImageCms  # lazily: only Lab TIFFs need littlecms

    try:
        lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
        lab_to_srgb = ImageCms.buildTransform(lab, srgb, "LAB", "RGB")
        return ImageCms.applyTransform(img, lab_to_srgb)
    except ImageCms.PyCMSError as exc:
        # a plain ValueError: _lab_to_rgb's caller (the decoder above) turns it into ImageError
        raise ValueError(str(exc)) from None


def _flatten(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _gray_array_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8)).convert("RGB")


def _scale_16bit(arr: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 by rounding, not by clipping at 255 as PIL's convert does."""
    return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _scale_int32(arr: np.ndarray) -> np.ndarray:
    """Mode I mostly carries 16-bit samples; anything outside that range is stretched to fit."""
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0 and hi <= 65535:
        return _scale_16bit(arr)
    span = max(hi - lo, 1)
    return ((arr.astype(np.float64) - lo) * (255.0 / span) + 0.5).astype(np.uint8)


def _scale_float(label: str, arr: np.ndarray, what: str) -> np.ndarray:
    if not np.all(np.isfinite(arr)):
        raise ImageError(f"{label}: {what} holds NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise ImageError(
            f"{label}: {what} has values in {lo:g}..{hi:g}, expected 0..1; divide 8-bit data by 255 first"
        )
    return (arr.astype(np.float64) * 255.0 + 0.5).astype(np.uint8)


def _array_to_rgb(label: str, arr: np.ndarray, limits: ImageLimits) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageError(f"{label}: shape {arr.shape} is not HxW, HxWx3 or HxWx4")
    _check_size(label, (arr.shape[1], arr.shape[0]), limits)
    arr8 = _array_to_uint8(label, arr)
    if arr8.ndim == 2:
        return _gray_array_to_rgb(arr8)
    if arr8.shape[2] == 4:
        return _flatten(Image.fromarray(np.ascontiguousarray(arr8)))
    return Image.fromarray(np.ascontiguousarray(arr8))


def _array_to_uint8(label: str, arr: np.ndarray) -> np.ndarray:
    kind = arr.dtype
    if kind == np.uint8:
        return arr
    if kind == np.bool_:
        return arr.astype(np.uint8) * 255
    if kind == np.uint16:
        return _scale_16bit(arr)
    if np.issubdtype(kind, np.floating):
        return _scale_float(label, arr, f"{kind} array")
    raise ImageError(
        f"{label}: dtype {kind} is not supported; use uint8, uint16 or floats in 0..1 "
        "(e.g. arr.astype(np.uint8) for 0..255 integers)"
    )
