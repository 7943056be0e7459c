"""Checks before writing: the folder is writable, outputs do not exist (or may be replaced), space suffices.

Converter and quantizer run them before any work starts, so a run that cannot
finish fails in a second with a message naming the path and the fix.
`error` is the caller's own refusal class (ConvertError, QuantError, ...).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from .errors import EdgeError, OutputError
from .units import format_bytes


def prepare_out_dir(out_dir: Path, error: type[EdgeError] = OutputError) -> None:
    """Create `out_dir` and prove a file can be written in it."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise error(f"{out_dir}: output directory is not writable ({e.strerror or e}); choose another with -o.") from e


def check_overwrite(targets: Iterable[Path], overwrite: bool, error: type[EdgeError] = OutputError) -> None:
    """Refuse to replace an existing output unless --overwrite was given."""
    existing = [str(p) for p in dict.fromkeys(targets) if Path(p).exists()]
    if existing and not overwrite:
        raise error(f"{existing[0]} already exists; pass --overwrite to replace it.")


def check_rewrite(src: Path, dst: Path, overwrite: bool, what: str, error: type[EdgeError] = OutputError) -> None:
    """A tool reads `src` and writes `dst`: the input exists, the output may be written, they differ."""
    if not src.is_file():
        raise error(f"{src}: {what} GGUF not found.")
    check_overwrite([dst], overwrite, error)
    if dst.resolve() == src.resolve():
        raise error(f"{dst}: input and output are the same file.")


def check_free_space(out_dir: Path, needed: int, what: str = "the output",
                     error: type[EdgeError] = OutputError) -> None:
    free = shutil.disk_usage(out_dir).free
    if free < needed:
        raise error(f"{out_dir}: needs {format_bytes(needed)} free for {what} but has {format_bytes(free)}; "
                    "free space or choose another directory with -o.")
