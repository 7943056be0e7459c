"""Write a file under a temporary name and rename it when complete.

Every output of this project goes through here, so an interrupted run never
leaves a file under its final name that looks finished.
"""
from __future__ import annotations

import errno
import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import OutputError

# Faults of the place written to, not of the data: reported as OutputError naming the path and the fix.
_WRITE_FAULTS = {errno.ENOSPC: "the disk is full: free space or write elsewhere",
                 errno.EROFS: "the file system is read-only: write elsewhere",
                 errno.EDQUOT: "the disk quota is exhausted: free space or write elsewhere",
                 errno.EACCES: "permission denied: make the folder writable or write elsewhere",
                 errno.EPERM: "permission denied: make the folder writable or write elsewhere"}


def partial_path(path: Path, unique: bool = False) -> Path:
    """The temporary name; `unique` adds the process and thread, for files that several writers
    may replace at once (a cache shared by processes), so that no writer truncates another's."""
    tag = f".{os.getpid()}.{threading.get_ident()}" if unique else ""
    return path.with_name(f".{path.name}{tag}.partial")


@contextmanager
def atomic_output(path: str | Path, *, unique: bool = False) -> Iterator[Path]:
    """Yield the temporary path to write; on success it replaces `path`, on any failure it is removed.

    A target that cannot be written (a directory, a missing or read-only folder, a full disk)
    is an OutputError naming it, raised before anything is written where it can be checked first.
    """
    path = Path(path)
    check_writable_target(path)
    tmp = partial_path(path, unique)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename not in (str(tmp), str(path)) and exc.errno not in _WRITE_FAULTS:
            raise  # a read inside the block failed: not the output's fault
        raise OutputError(f"cannot write {path}: {_WRITE_FAULTS.get(exc.errno, exc.strerror)}") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the folder went away or was never there: nothing to clean
            pass


def check_writable_target(path: Path) -> None:
    """Refuse a target that is a directory or whose folder is missing or a file, naming the fix."""
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a directory; give a file name inside it")
    parent = path.parent
    if not parent.exists():
        raise OutputError(f"cannot write {path}: the folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: {parent} is not a folder (it is a file)")


def writable_dir(path: Path, what: str, fix: str) -> bool:
    """Whether files can be created in the folder `path` (which may not exist yet): False when it,
    or the nearest folder above it that exists, is read-only or cannot be entered.

    A file at `path` or above it is an OutputError naming `what`, the file and `fix`: no later
    write could succeed, and a user who gave that path wants to hear it at once.
    """
    path = Path(path).expanduser()
    for place in (path, *path.parents):
        try:
            if not place.exists():
                continue
        except OSError:  # a folder above it cannot be entered
            return False
        if not place.is_dir():
            where = "it is a file" if place == path else f"{place} is a file, not a folder"
            raise OutputError(f"{what} {path}: {where}; {fix}")
        return os.access(place, os.W_OK | os.X_OK)
    return False


def write_bytes_atomic(path: Path, data: bytes, *, unique: bool = False) -> None:
    with atomic_output(path, unique=unique) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
