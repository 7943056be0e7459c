"""A conversation on disk: its messages, the units in its KV cache and the cells themselves.

Restoring the KV cells of a sequence (`llama_state_seq_set_data`) skips the
whole prefill of a conversation, images included. The cells only mean something
to the same weights with the same KV layout, so the file records what they
depend on (`StateFingerprint`) and a restore into anything else is refused.

Layout (little-endian):

    b"EDGECONV" | u32 version | u64 header length | header (JSON) | KV bytes | sha256 of all before

The trailing checksum refuses truncated or altered files before llama.cpp
reads a byte of them (it detects damage, it is no signature: keep saved
conversations where only trusted users can write). Files are written under a
temporary name, synced and renamed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from edge_common.atomic import atomic_output

from edge_runtime.errors import SavedConversationError
from edge_runtime.core.kv_state import StateFingerprint, Unit, image_unit, text_units
from edge_runtime.vision.image_input import ImageInput
from edge_runtime.vision.video import VideoInput

MAGIC = b"EDGECONV"
VERSION = 1
SUFFIX = ".edgeconv"
_PREAMBLE = struct.Struct("<8sIQ")
_DIGEST = 32
_MAX_HEADER = 256 << 20  # messages (with a server's data: URIs) and unit lists


@dataclass
class SavedConversation:
    """Everything in the file; `kv` is llama.cpp's serialised sequence."""

    depends_on: StateFingerprint
    units: list[Unit]
    messages: list[dict]  # images as {"type": "image", "digest", "width", "height"}
    kv: bytearray
    n_ctx: int = 0  # the context it was saved from (informative)
    system_prompt: str | None = None
    model_files: dict[str, str | None] | None = None  # names, so `VisionChat.load` can find them
    created: float = 0.0

    @property
    def n_tokens(self) -> int:
        return sum(u.n_tokens for u in self.units)

    def check_fits(self, here: StateFingerprint, n_ctx_seq: int, source: str | Path) -> None:
        """Refuse a restore into another model or KV layout, or a context too small for it."""
        diffs = self.depends_on.differences(here)
        if diffs:
            raise SavedConversationError(
                f"{source}: the saved KV cache belongs to other model settings ({'; '.join(diffs)}); "
                "restore it with the model files and KV/image settings it was saved with"
            )
        if self.n_tokens > n_ctx_seq:
            raise SavedConversationError(
                f"{source}: the conversation holds {self.n_tokens} tokens but this context has room for "
                f"{n_ctx_seq} per sequence; raise n_ctx (--ctx-size)"
            )


# ---------------------------------------------------------------- file identity




# ---------------------------------------------------------------- messages and units as JSON


def map_parts(messages: Sequence[dict], fn: Callable[[Any], Any]) -> list[dict]:
    """Copies of `messages` with `fn` applied to each part of list contents (string contents kept)."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [fn(p) for p in content]
        out.append({**message, "content": content})
    return out


def messages_to_json(messages: Sequence[dict]) -> list[dict]:
    """History -> JSON: each image (an ImageInput) becomes a reference by digest and size."""
    return map_parts(messages, _part_to_json)


def messages_from_json(messages: Any, source: str | Path) -> list[dict]:
    """JSON -> history: image references become pixel-less ImageInputs (the KV cache holds them)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise SavedConversationError(f"{source}: 'messages' must be a list of {{'role', 'content'}} objects")
    return map_parts(messages, lambda part: _part_from_json(part, source))


def _part_to_json(part: Any) -> Any:
    if isinstance(part, dict) and isinstance(part.get("image"), ImageInput):
        img = part["image"]
        kept = {"url": part["url"]} if "url" in part else {}  # the data: URI a server client sent
        return {"type": "image", "digest": img.digest, "width": img.width, "height": img.height, **kept}
    if isinstance(part, ImageInput):
        return {"type": "image", "digest": part.digest, "width": part.width, "height": part.height}
    if isinstance(part, dict) and isinstance(part.get("video"), VideoInput):
        clip = part["video"]  # frame pairs by digest (a pair shares one), their times and size
        return {"type": "video", "pairs": [f.digest for f in clip.frames[::2]], "timestamps": list(clip.timestamps),
                "width": clip.width, "height": clip.height, "source_fps": clip.source_fps,
                "indices": list(clip.indices)}
    return part


def _part_from_json(part: Any, source: str | Path) -> Any:
    if isinstance(part, dict) and part.get("type") == "image" and "digest" in part:
        try:
            image = ImageInput(str(part["digest"]), int(part["width"]), int(part["height"]))
        except (KeyError, TypeError, ValueError):
            raise SavedConversationError(f"{source}: an image reference lacks digest/width/height") from None
        return {"type": "image", "image": image, **({"url": part["url"]} if "url" in part else {})}
    if isinstance(part, dict) and part.get("type") == "video" and "pairs" in part:
        try:
            w, h = int(part["width"]), int(part["height"])
            frames = tuple(ImageInput(str(d), w, h, mergeable=True) for d in part["pairs"] for _ in range(2))
            clip = VideoInput(frames, tuple(float(t) for t in part["timestamps"]), w, h, float(part["source_fps"]),
                              tuple(int(i) for i in part["indices"]))
        except (KeyError, TypeError, ValueError):
            raise SavedConversationError(f"{source}: a video reference lacks pairs/timestamps/size") from None
        if len(clip.timestamps) != len(part["pairs"]):
            raise SavedConversationError(f"{source}: a video reference has {len(part['pairs'])} frame pairs "
                                         f"but {len(clip.timestamps)} timestamps")
        return {"type": "video", "video": clip}
    return part


def units_to_json(units: Sequence[Unit]) -> list[Any]:
    """Runs of text tokens as lists, images as objects: compact and readable."""
    out: list[Any] = []
    for unit in units:
        if unit.is_image:
            _, digest, n_tokens = unit.key  # type: ignore[misc]
            out.append({"image": digest, "n_tokens": n_tokens, "n_pos": unit.n_pos})
        elif out and isinstance(out[-1], list):
            out[-1].append(int(unit.key))  # type: ignore[arg-type]
        else:
            out.append([int(unit.key)])  # type: ignore[arg-type]
    return out


def units_from_json(data: Any, source: str | Path) -> list[Unit]:
    if not isinstance(data, list):
        raise SavedConversationError(f"{source}: 'units' must be a list")
    units: list[Unit] = []
    try:
        for item in data:
            if isinstance(item, list):
                units.extend(text_units([_count(t, "units[].token", source, 0) for t in item]))
            else:
                units.append(image_unit(str(item["image"]), _count(item["n_tokens"], "units[].n_tokens", source),
                                        _count(item["n_pos"], "units[].n_pos", source)))
    except (KeyError, TypeError):
        raise SavedConversationError(f"{source}: 'units' holds an entry that is neither tokens nor an image") from None
    return units


def _count(value: Any, field: str, source: str | Path, minimum: int = 1) -> int:
    """A whole number of at least `minimum` from a header: a tampered file is refused naming the field."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SavedConversationError(f"{source} is damaged: '{field}' must be a whole number >= {minimum}, "
                                     f"got {value!r}; save the conversation again")
    return value


# ---------------------------------------------------------------- the file


def write_conversation(path: str | Path, conv: SavedConversation) -> int:
    """Write atomically (temp file, fsync, rename); returns the file size in bytes."""
    header = json.dumps({
        "format": "edge-conversation",
        "version": VERSION,
        "created": conv.created or time.time(),
        "depends_on": asdict(conv.depends_on),
        "model_files": conv.model_files,
        "n_ctx": conv.n_ctx,
        "n_tokens": conv.n_tokens,
        "system_prompt": conv.system_prompt,
        "messages": conv.messages,
        "units": units_to_json(conv.units),
        "kv_bytes": len(conv.kv),
    }, ensure_ascii=False).encode("utf-8")
    path = Path(path)
    digest = hashlib.sha256()
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            for block in (_PREAMBLE.pack(MAGIC, VERSION, len(header)), header, conv.kv):
                digest.update(block)
                f.write(block)
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
    return path.stat().st_size


def read_conversation(path: str | Path) -> SavedConversation:
    """Read and verify a saved conversation; any damage raises SavedConversationError."""
    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except OSError as exc:
        raise SavedConversationError(f"cannot open saved conversation {path}: {exc.strerror}") from None
    with f:
        pre = f.read(_PREAMBLE.size)
        if len(pre) < _PREAMBLE.size or pre[:8] != MAGIC:
            raise SavedConversationError(f"{path} is not a saved conversation (no {MAGIC.decode()} header)")
        _, version, header_len = _PREAMBLE.unpack(pre)
        if version != VERSION:
            raise SavedConversationError(
                f"{path} has format version {version}; this runtime reads version {VERSION}")
        if header_len > min(_MAX_HEADER, size):
            raise SavedConversationError(f"{path} is truncated or damaged (header of {header_len} bytes)")
        raw_header = f.read(header_len)
        digest = hashlib.sha256(pre)
        digest.update(raw_header)
        try:
            header = json.loads(raw_header.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SavedConversationError(f"{path} is truncated or damaged (unreadable header)") from None
        if not isinstance(header, dict):
            raise SavedConversationError(f"{path} is truncated or damaged (its header is no JSON object)")
        kv_len = _count(header.get("kv_bytes"), "kv_bytes", path, 0)
        expected = _PREAMBLE.size + header_len + kv_len + _DIGEST
        if size != expected:
            raise SavedConversationError(
                f"{path} is truncated or damaged: {size} bytes on disk, the header announces {expected}")
        kv = bytearray(kv_len)
        if f.readinto(kv) != kv_len:
            raise SavedConversationError(f"{path} is truncated (KV data cut short)")
        digest.update(kv)
        if f.read(_DIGEST) != digest.digest():
            raise SavedConversationError(f"{path} is damaged or was altered: its checksum does not match")
    created = header.get("created") or 0.0
    if isinstance(created, bool) or not isinstance(created, (int, float)) or not math.isfinite(created):
        raise SavedConversationError(f"{path} is damaged: 'created' must be a time in seconds, got {created!r}")
    system_prompt, model_files = header.get("system_prompt"), header.get("model_files")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise SavedConversationError(f"{path} is damaged: 'system_prompt' must be text or null, got {system_prompt!r}")
    if model_files is not None and not (isinstance(model_files, dict) and all(
            isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in model_files.items())):
        raise SavedConversationError(f"{path} is damaged: 'model_files' must map 'model'/'mmproj' to paths, "
                                     f"got {model_files!r}")
    try:
        depends_on = StateFingerprint.from_json(header.get("depends_on"))
    except SavedConversationError as exc:
        raise SavedConversationError(f"{path}: {exc}") from None
    return SavedConversation(
        depends_on=depends_on,
        units=units_from_json(header.get("units"), path),
        messages=messages_from_json(header.get("messages", []), path),
        kv=kv,
        n_ctx=_count(header.get("n_ctx") or 0, "n_ctx", path, 0),
        system_prompt=system_prompt,
        model_files=model_files,
        created=float(created),
    )
