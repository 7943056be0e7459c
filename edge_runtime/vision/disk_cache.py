"""Vision-encoder outputs on disk, so a new process asking about the same photo skips the encoder.

Entries are keyed by the projector's sha256 and the digest of the resized image
(which fixes its grid); each file carries a checksum of its payload, and a
damaged or foreign entry is ignored (and rewritten by the next encode), never
used. Writes go through edge_common.atomic (temporary name, then rename); the
directory is kept under `max_bytes` by removing the least recently used entries.

A read-only cache directory (a warmed cache shipped on a read-only system image) is
used as it is: its entries are read, nothing is written, one warning says so. A
path that is a file, or lies under one, is refused when the options are made
(`check_cache_dir`), since no write there could ever succeed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path

import numpy as np

from edge_common.atomic import writable_dir, write_bytes_atomic
from edge_common.errors import OutputError
from edge_common.manifest import file_sha256

log = logging.getLogger("edge_runtime")

__all__ = ["DiskEncoderCache", "check_cache_dir", "projector_sha256", "user_cache_dir"]

MAGIC = b"EDGEENC1"
_HEADER = struct.Struct("<8sI")  # magic, header-json length
SUFFIX = ".emb"


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/qwen3-vl-edge (default ~/.cache/qwen3-vl-edge): encoder outputs, device costs."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qwen3-vl-edge"


def check_cache_dir(path: str | Path) -> bool:
    """Whether the encoder cache directory `path` can be written (False: read-only, used for reading).

    A file at or above `path` is an OutputError naming it and the fix.
    """
    return writable_dir(Path(path), "encoder cache dir",
                        "give a folder (encoder_cache_dir=..., --encoder-cache-dir) or keep no encoder outputs on "
                        "disk (encoder_cache_dir=None, --no-encoder-cache)")


def projector_sha256(path: Path, memo_dir: Path, writable: bool = True) -> str:
    """sha256 of the projector, remembered in `memo_dir` by (path, size, mtime): a new process skips re-reading it."""
    st = path.stat()
    ident = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    memo = memo_dir / "sha256.json"
    try:
        table = json.loads(memo.read_text())
    except (OSError, ValueError):
        table = {}
    if not isinstance(table, dict):
        table = {}
    if ident not in table:
        table[ident] = file_sha256(path)
        if writable:
            try:
                write_bytes_atomic(memo, json.dumps(table).encode(), unique=True)
            except (OSError, OutputError):  # a memo only saves time
                pass
    return str(table[ident])


class DiskEncoderCache:
    """Embeddings (float32 arrays) of one projector under `root/<projector sha256[:16]>/`.

    `writable` False: entries are only read (a read-only directory).
    """

    def __init__(self, root: str | Path, projector_sha256: str, max_bytes: int, writable: bool = True) -> None:
        self.root = Path(root).expanduser()
        self.dir = self.root / projector_sha256[:16]
        self.projector = projector_sha256
        self.max_bytes = max_bytes
        self.writable = writable
        if writable:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # turned read-only or full since the options were checked
                log.warning("encoder cache: cannot create %s (%s): its entries are read, none is written",
                            self.dir, exc.strerror)
                self.writable = False

    def path(self, key: str) -> Path:
        return self.dir / (hashlib.sha256(key.encode()).hexdigest()[:32] + SUFFIX)

    def get(self, key: str) -> np.ndarray | None:
        """The stored array, or None if absent, damaged or written for another key/projector."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        array = _parse(data, key, self.projector)
        if array is None:
            log.warning("encoder cache: ignoring damaged entry %s", path)
            return None
        if self.writable:
            try:
                os.utime(path)  # recently used: evicted last
            except OSError:
                pass
        return array

    def discard(self, key: str) -> None:
        """Forget a damaged entry, so that the next encoding rewrites it."""
        if not self.writable:  # the length check refuses it again next time
            return
        try:
            self.path(key).unlink(missing_ok=True)
        except OSError:  # a read-only cache keeps it; the length check refuses it again next time
            pass

    def put(self, key: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not self.writable or array.nbytes > self.max_bytes:
            return
        payload = array.tobytes()
        header = json.dumps({
            "key": key, "projector": self.projector, "shape": list(array.shape),
            "sha256": hashlib.sha256(payload).hexdigest(),
        }).encode()
        try:
            write_bytes_atomic(self.path(key), _HEADER.pack(MAGIC, len(header)) + header + payload, unique=True)
            self._evict()
        except (OSError, OutputError) as exc:  # a full or read-only disk costs speed, not the answer
            log.warning("encoder cache: could not write %s: %s", self.dir, exc)

    def _evict(self) -> None:
        entries = []
        for p in self.dir.glob("*" + SUFFIX):
            try:
                st = p.stat()
            except OSError:
                continue
            entries.append((st.st_mtime_ns, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries):
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size


def _parse(data: bytes, key: str, projector: str) -> np.ndarray | None:
    try:
        magic, n = _HEADER.unpack_from(data)
        if magic != MAGIC:
            return None
        header = json.loads(data[_HEADER.size:_HEADER.size + n])
        payload = data[_HEADER.size + n:]
        if header["key"] != key or header["projector"] != projector:
            return None
        if hashlib.sha256(payload).hexdigest() != header["sha256"]:
            return None
        shape = tuple(int(x) for x in header["shape"])
        array = np.frombuffer(payload, dtype=np.float32)
        if array.size != int(np.prod(shape)):
            return None
        return array.reshape(shape)
    except (struct.error, ValueError, KeyError, TypeError):
        return None

