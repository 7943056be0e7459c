"""The one exception root: an app catches everything this library refuses with `except EdgeError`."""
from __future__ import annotations

__all__ = ["EdgeError", "ModelFileError", "OutputError"]


class EdgeError(Exception):
    """Base of every refusal raised by qwen3-vl-edge (convert, quant, runtime, server).

    Specific classes keep their other bases (ValueError, FileNotFoundError, ...) so
    existing `except ValueError` code keeps working.
    """


class ModelFileError(EdgeError, FileNotFoundError):
    """A GGUF file, converter output directory or manifest entry is missing or unreadable."""


class OutputError(EdgeError, ValueError):
    """An output cannot be written: it exists without --overwrite, the folder is unwritable or too full."""
