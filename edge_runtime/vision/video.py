"""Video input: frames sampled, sized and timed the way transformers' Qwen3-VL processor does.

Qwen3-VL reads a clip as temporal groups of 2 frames. Each group is encoded like one
image (its two frames are the two temporal slices of the patch embedding) and the
prompt puts the group's time before it: `<1.5 seconds><|vision_start|>...<|vision_end|>`.
llama.cpp's mtmd merges two adjacent bitmaps marked "mergeable" (same size) into such a
group, so a clip is handed over as frame pairs and matches transformers exactly.

Frames come from a file or bytes (decoded with PyAV, the `video` extra), a data URI,
a list of images, or a T x H x W x 3 array. Sampling (`fps`, `min_frames`,
`max_frames`), the timestamps and the clip-wide resize are ports of
`Qwen3VLVideoProcessor` / `Qwen3VLProcessor`; the token budget is a total for the clip.
"""
from __future__ import annotations

import hashlib
import io
import math
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edge_models import chat_format, family_for_gguf

from edge_runtime.vision.images import ImageError, ImageLimits, data_uri_bytes, load_image, to_rgb_array
from edge_runtime.vision.image_input import ImageInput
from edge_runtime.vision.resize import resize_rgb, smart_resize_video

__all__ = [
    "VideoError",
    "VideoInput",
    "VideoOptions",
    "default_video_tokens",
    "group_timestamps",
    "load_video",
    "sample_indices",
    "timestamp_text",
]

# The default family's video processor defaults and patch geometry (no GGUF carries them),
# as its chat markup below.
_VISION = family_for_gguf().vision
DEFAULT_FPS = _VISION.video_fps
MIN_FRAMES = _VISION.video_min_frames
MAX_FRAMES = _VISION.video_max_frames
TEMPORAL_PATCH = _VISION.temporal_patch_size
FACTOR = _VISION.factor
# mtmd's own bounds on one image's tokens for Qwen-VL projectors: a frame outside them
# would be resized again by llama.cpp and no longer match transformers.
MTMD_MIN_TOKENS, MTMD_MAX_TOKENS = 8, 4096
# Without an explicit max_frames a long clip is sampled uniformly so that each group
# keeps at least this many tokens (a 6 x 6 grid, 192 x 192 pixels at 4:3).
MIN_GROUP_TOKENS = 32
# Vision tokens for one clip by default: on a CPU a 10-second clip then costs about as
# much as two photos (a 640x480 photo is 300 tokens); a GPU affords Qwen's own density.
DEFAULT_TOKENS_CPU = 512
DEFAULT_TOKENS_GPU = 2048
MAX_FPS = 60.0
_FORMAT = chat_format()


class VideoError(ImageError):
    """A video could not be used; the message names the input and the fix."""


def default_video_tokens(on_gpu: bool) -> int:
    return DEFAULT_TOKENS_GPU if on_gpu else DEFAULT_TOKENS_CPU


@dataclass(frozen=True)
class VideoOptions:
    """How a clip becomes frames. `max_tokens` None: `default_video_tokens` of the device."""

    fps: float = DEFAULT_FPS
    max_frames: int | None = None
    min_frames: int = MIN_FRAMES
    max_tokens: int | None = None
    max_bytes: int = 512 * 1024 * 1024
    max_side: int = 8192
    max_frame_pixels: int = 8192 * 4320
    max_duration_s: float = 6 * 3600.0

    def __post_init__(self) -> None:
        fps = self.fps
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or not 0 < fps <= MAX_FPS:
            raise VideoError(f"video fps={fps!r} is out of range: use a number in (0, {MAX_FPS:g}] "
                             f"(the model samples at {DEFAULT_FPS:g})")
        for name, low, high in (("max_frames", 1, MAX_FRAMES), ("min_frames", 1, MAX_FRAMES)):
            value = getattr(self, name)
            if value is None and name == "max_frames":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise VideoError(f"video {name}={value!r} is out of range: use an integer in [{low}, {high}]")
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < MTMD_MIN_TOKENS
        ):
            raise VideoError(f"video max_tokens={self.max_tokens!r} must be an integer >= {MTMD_MIN_TOKENS}")
        for name in ("max_bytes", "max_side", "max_frame_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise VideoError(f"video {name}={value!r} must be a positive integer")

    def budget(self, on_gpu: bool = False) -> int:
        """Image tokens for the whole clip: `max_tokens`, or a default sized for the device's speed."""
        return self.max_tokens if self.max_tokens is not None else default_video_tokens(on_gpu)

    def frame_cap(self, on_gpu: bool = False) -> int:
        """max_frames, or as many frames as leave each group MIN_GROUP_TOKENS of the budget."""
        if self.max_frames is not None:
            return self.max_frames
        groups = max(1, self.budget(on_gpu) // MIN_GROUP_TOKENS)
        return max(self.min_frames, min(MAX_FRAMES, TEMPORAL_PATCH * groups))


@dataclass(frozen=True)
class VideoInput:
    """A clip ready for mtmd: frame pairs (one ImageInput per frame, a pair shares its
    digest) and the time of each pair in seconds."""

    frames: tuple[ImageInput, ...] = field(repr=False)
    timestamps: tuple[float, ...]
    width: int
    height: int
    source_fps: float
    indices: tuple[int, ...] = field(repr=False)
    label: str = "video"

    @property
    def n_groups(self) -> int:
        """Temporal groups (frame pairs): mtmd encodes each pair as one image."""
        return len(self.timestamps)

    @property
    def tokens_per_group(self) -> int:
        """Image tokens of one group, the same for every group since the clip has one size."""
        return (self.width // FACTOR) * (self.height // FACTOR)

    @property
    def n_tokens(self) -> int:
        """Image tokens of the whole clip, what it takes from the context."""
        return self.n_groups * self.tokens_per_group

    def prompt_text(self, marker: str) -> str:
        """What replaces the template's video placeholder: each group's time, then its two frames."""
        return "".join(timestamp_text(t) + marker * TEMPORAL_PATCH for t in self.timestamps)


def timestamp_text(seconds: float) -> str:
    """The family's time mark before a frame group (Qwen3-VL: `<1.2 seconds>`)."""
    return _FORMAT.video_timestamp.format(seconds=seconds)


def sample_indices(total: int, source_fps: float, fps: float, min_frames: int, max_frames: int) -> np.ndarray:
    """Frame indices to keep: Qwen3VLVideoProcessor.sample_frames (uniform over the clip)."""
    n = int(total / source_fps * fps)
    n = min(max(n, min_frames), max_frames, total)
    return np.linspace(0, total - 1, n).round().astype(int)


def group_timestamps(indices: Sequence[int], source_fps: float) -> list[float]:
    """Seconds of each temporal group: Qwen3VLProcessor._calculate_timestamps (mean of the pair)."""
    idx = [int(i) for i in indices]
    if len(idx) % TEMPORAL_PATCH:
        idx.extend(idx[-1] for _ in range(TEMPORAL_PATCH - len(idx) % TEMPORAL_PATCH))
    times = [i / source_fps for i in idx]
    return [(times[i] + times[i + TEMPORAL_PATCH - 1]) / 2 for i in range(0, len(times), TEMPORAL_PATCH)]


def plan_size(
    n_frames: int, height: int, width: int, budget: int, frame_max_tokens: int = MTMD_MAX_TOKENS
) -> tuple[int, int]:
    """One frame size for the clip: transformers' clip-wide smart_resize with the pixel
    bound set from the token budget (2 frames x 32 x 32 pixels per token), and no frame
    above what mtmd takes without resizing it again."""
    n = max(n_frames, TEMPORAL_PATCH)
    t_bar = round(n / TEMPORAL_PATCH) * TEMPORAL_PATCH
    max_pixels = min(budget * TEMPORAL_PATCH * FACTOR * FACTOR, t_bar * frame_max_tokens * FACTOR * FACTOR)
    min_pixels = t_bar * MTMD_MIN_TOKENS * FACTOR * FACTOR
    return smart_resize_video(n, height, width, temporal_factor=TEMPORAL_PATCH, factor=FACTOR,
                              min_pixels=min_pixels, max_pixels=max_pixels)


# ---------------------------------------------------------------- loading


def load_video(
    src: Any,
    name: str = "video",
    options: VideoOptions = VideoOptions(),
    *,
    on_gpu: bool = False,
    frame_min_tokens: int = MTMD_MIN_TOKENS,
    frame_max_tokens: int = MTMD_MAX_TOKENS,
) -> VideoInput:
    """Any supported clip source -> VideoInput.

    Sources: a path, file:// URL or data:video/... URI, bytes (any container FFmpeg
    reads), a T x H x W x 3 array, or a list of images (taken as frames `1 / fps` apart).
    """
    if isinstance(src, VideoInput):
        return src
    if isinstance(src, np.ndarray) and src.ndim == 4:
        return _from_frames(list(src), _label(name, "array"), options, on_gpu, frame_min_tokens, frame_max_tokens)
    if isinstance(src, (list, tuple)):
        return _from_frames(list(src), _label(name, "frame list"), options, on_gpu, frame_min_tokens, frame_max_tokens)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        return _from_file(io.BytesIO(data), len(data), _label(name, "bytes"), options, on_gpu,
                          frame_min_tokens, frame_max_tokens)
    if isinstance(src, (str, Path)):
        text = str(src)
        if isinstance(src, str) and text[:5].lower() == "data:":
            label = _label(name, "data URI")
            data = data_uri_bytes(label, text, options.max_bytes, media="video", error=VideoError,
                                  limit="VideoOptions.max_bytes")
            return _from_file(io.BytesIO(data), len(data), label, options, on_gpu, frame_min_tokens, frame_max_tokens)
        if isinstance(src, str) and text[:7].lower() == "file://":
            text = urllib.parse.unquote(urllib.parse.urlparse(text).path)
        elif isinstance(src, str) and "://" in text[:12]:
            raise VideoError(f"{_label(name, 'URL')}: remote URLs are not fetched ({text[:60]!r}); "
                             "download the video and pass its bytes or a local path")
        path = Path(text).expanduser()
        label = _label(name, f"file '{path}'")
        if not path.is_file():
            raise VideoError(f"{label}: file not found or not a regular file; check the path")
        size = path.stat().st_size
        return _from_file(str(path), size, label, options, on_gpu, frame_min_tokens, frame_max_tokens)
    raise VideoError(
        f"{_label(name, type(src).__name__)}: unsupported video source; pass a path, bytes, a "
        "data:video/...;base64 URI, a list of images or a T x H x W x 3 uint8 array"
    )


def _label(name: str, kind: str) -> str:
    return f"{name} ({kind})"


def _from_frames(
    frames: list, label: str, options: VideoOptions, on_gpu: bool, min_tok: int, max_tok: int
) -> VideoInput:
    if not frames:
        raise VideoError(f"{label}: no frames; pass at least one image")
    limits = ImageLimits(max_side=options.max_side, max_pixels=options.max_frame_pixels)
    indices = sample_indices(len(frames), options.fps, options.fps, options.min_frames, options.frame_cap(on_gpu))
    picked: dict[int, np.ndarray] = {}
    for i in indices:
        if int(i) not in picked:
            picked[int(i)] = to_rgb_array(load_image(frames[int(i)], name=f"{label} frame {int(i)}", limits=limits))
    sizes = {a.shape[:2] for a in picked.values()}
    if len(sizes) > 1:
        raise VideoError(f"{label}: frames differ in size ({sorted(sizes)}); a clip needs one frame size")
    (h, w), = sizes
    return _assemble(label, picked, indices, options.fps, h, w, options, on_gpu, min_tok, max_tok)


def _assemble(
    label: str, picked: dict[int, np.ndarray], indices: np.ndarray, source_fps: float, height: int, width: int,
    options: VideoOptions, on_gpu: bool, min_tok: int, max_tok: int,
) -> VideoInput:
    """Resize the sampled frames to the clip's size and pair them (the last repeated if odd)."""
    rh, rw = _frame_size(label, len(indices), height, width, options, on_gpu, min_tok, max_tok)
    sized = {i: resize_rgb(a, rh, rw) for i, a in picked.items()}
    order = [int(i) for i in indices]
    if len(order) % TEMPORAL_PATCH:
        order.append(order[-1])  # transformers' patchify repeats the last frame
    frames: list[ImageInput] = []
    for k in range(0, len(order), TEMPORAL_PATCH):
        pair = [sized[i] for i in order[k : k + TEMPORAL_PATCH]]
        h = hashlib.sha256(f"video:{rw}x{rh}:".encode())
        for a in pair:
            h.update(a.tobytes())
        digest = h.hexdigest()
        frames.extend(ImageInput.from_array(a, digest, mergeable=True) for a in pair)
    return VideoInput(tuple(frames), tuple(group_timestamps(indices, source_fps)), rw, rh, source_fps,
                      tuple(int(i) for i in indices), label)


def _frame_size(
    label: str, n_frames: int, height: int, width: int, options: VideoOptions, on_gpu: bool, min_tok: int, max_tok: int
) -> tuple[int, int]:
    budget = options.budget(on_gpu)
    try:
        rh, rw = plan_size(n_frames, height, width, budget, max_tok)
    except ValueError as exc:
        raise VideoError(f"{label}: {exc}") from None
    tokens = (rh // FACTOR) * (rw // FACTOR)
    if tokens < min_tok:
        groups = -(-n_frames // TEMPORAL_PATCH)
        raise VideoError(
            f"{label}: {groups} frame pair(s) in a budget of {budget} tokens leave {tokens} token(s) per pair, "
            f"under the projector's minimum of {min_tok} (image_min_tokens); lower fps or max_frames, raise the "
            f"video token budget (max_tokens) to at least {groups * min_tok}, or lower image_min_tokens"
        )
    return rh, rw


# ---------------------------------------------------------------- PyAV


def _import_av() -> Any:
    try:
        import av
    except ImportError:
        raise VideoError(
            "reading video files needs PyAV: pip install 'qwen3-vl-edge[video]' (or pass the frames as a list of images)"
        ) from None
    return av


def _from_file(
    src: Any, size: int, label: str, options: VideoOptions, on_gpu: bool, min_tok: int, max_tok: int
) -> VideoInput:
    if size == 0:
        raise VideoError(f"{label}: no data (0 bytes)")
    if size > options.max_bytes:
        raise VideoError(f"{label}: {size} bytes exceeds VideoOptions.max_bytes={options.max_bytes}")
    av = _import_av()
    try:
        container = av.open(src, mode="r")
    except av.error.FFmpegError as exc:
        raise VideoError(f"{label}: not a video FFmpeg can read ({_reason(exc)}); the file is corrupt, "
                         "truncated or not a video") from None
    try:
        with container:
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams})
                if "audio" not in kinds:  # an MP4 cut inside its index (moov): no stream, or a 'data' one
                    raise VideoError(f"{label}: the file has no video stream (streams: {', '.join(kinds) or 'none'}); "
                                     "it is truncated or corrupt (an MP4 cut inside its index): send the whole file")
                raise VideoError(f"{label}: the file has no video stream (streams: {', '.join(kinds)}); "
                                 "an audio-only file cannot be used as video")
            stream = container.streams.video[0]
            codec = stream.codec_context
            if codec is None:
                raise VideoError(f"{label}: FFmpeg has no decoder for this video's codec "
                                 f"({getattr(stream, 'codec_tag', '') or 'unknown'}); the file is truncated or corrupt, "
                                 "or its codec is not supported: re-encode the clip as H.264, VP9 or MPEG-4")
            width, height = int(codec.width or 0), int(codec.height or 0)
            if width < 1 or height < 1:
                raise VideoError(f"{label}: the video stream has no frame size (codec {codec.name!r}); "
                                 "the file is corrupt or its codec is not supported")
            if max(width, height) > options.max_side or width * height > options.max_frame_pixels:
                raise VideoError(f"{label}: {width}x{height} frames exceed VideoOptions.max_side={options.max_side} / "
                                 f"max_frame_pixels={options.max_frame_pixels}; downscale the video")
            source_fps = _stream_fps(stream)
            total = _frame_count(container, stream, source_fps)
            if total < 1:
                raise VideoError(f"{label}: the video stream has no frames")
            if total / source_fps > options.max_duration_s:
                raise VideoError(f"{label}: {total / source_fps:.0f} s is longer than VideoOptions.max_duration_s="
                                 f"{options.max_duration_s:g}; cut the clip")
            indices = sample_indices(total, source_fps, options.fps, options.min_frames, options.frame_cap(on_gpu))
            picked = _decode(av, container, stream, indices, label)
    except av.error.FFmpegError as exc:  # anything FFmpeg refuses midway: a damaged or odd file
        raise VideoError(f"{label}: cannot read the video ({_reason(exc)}); the file is corrupt or its "
                         "codec is not supported") from None
    if not picked:
        raise VideoError(f"{label}: no frame could be decoded (a zero-frame or corrupt video)")
    # Metadata that over-counts frames: indices past the end take the last decoded frame.
    last = picked[max(picked)]
    picked = {int(i): picked.get(int(i), last) for i in indices}
    height, width = last.shape[:2]
    return _assemble(label, picked, indices, source_fps, height, width, options, on_gpu, min_tok, max_tok)


def _decode(av: Any, container: Any, stream: Any, indices: np.ndarray, label: str) -> dict[int, np.ndarray]:
    """Decode in order and keep only the sampled frames (a clip is never held whole in memory)."""
    wanted = set(int(i) for i in indices)
    stop = max(wanted)
    picked: dict[int, np.ndarray] = {}
    stream.thread_type = "AUTO"
    try:
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                picked[i] = frame.to_ndarray(format="rgb24")
            if i >= stop:
                break
    except av.error.FFmpegError as exc:
        if not picked:
            raise VideoError(f"{label}: cannot decode the video ({_reason(exc)}); the file is corrupt or its "
                             "codec is not supported") from None
    except (ValueError, NotImplementedError) as exc:  # PyAV: no decoder for this codec
        raise VideoError(f"{label}: cannot decode the video ({exc}); its codec is not supported") from None
    return picked


def _stream_fps(stream: Any) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            fps = float(rate)
            if math.isfinite(fps) and 0 < fps <= 1000:
                return fps
    return 24.0  # as transformers assumes when a clip carries no rate


def _frame_count(container: Any, stream: Any, fps: float) -> int:
    if stream.frames and stream.frames > 0:
        return int(stream.frames)
    if stream.duration and stream.time_base:
        return int(round(float(stream.duration * stream.time_base) * fps))
    if container.duration:
        return int(round(container.duration / 1_000_000 * fps))
    count = sum(1 for packet in container.demux(stream) if packet.size)  # no metadata: count packets
    if count:
        container.seek(0)
    return count


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
