"""Write a file under a temporary name and rename it when complete.

Every output of this project goes through here, so an interrupted run never
leaves a file under its final name that looks finished.
"""
from __future__ import annotations

import errno
import json
import os
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


def partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield the temporary path to write; on success it replaces `path`, on any failure it is removed.

    A target that cannot be written (a directory, a missing or read-only folder, a full disk)
    is an OutputError naming it, raised before anything is written where it can be checked first.
    """
    path = Path(path)
    check_writable_target(path)
    tmp = partial_path(path)
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


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
