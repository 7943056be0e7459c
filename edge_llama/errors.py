"""What the llama.cpp access layer refuses; every class derives from EdgeError."""
from __future__ import annotations

from edge_common.errors import EdgeError


class LlamaError(EdgeError, RuntimeError):
    """llama.cpp refused a file or an operation; the message names the file and carries its log lines."""


class LlamaLoadError(LlamaError):
    """A model, context or projector could not be created; `log_lines` holds llama.cpp's error lines."""

    def __init__(self, message: str, log_lines: list[str] | None = None):
        super().__init__(message)
        self.log_lines = list(log_lines or [])


class KVTypeError(EdgeError, ValueError):
    """An unknown KV-cache type, or one whose blocks do not fit the model's rows."""


class LoadOptionError(EdgeError, ValueError):
    """A load setting (mmap, extra buffer types, AMX, GPU layers) has a value llama.cpp cannot use."""


class DamagedGGUFError(LlamaLoadError):
    """A GGUF's structure (lengths, token arrays, tensor records) cannot be right; `key` names where."""

    def __init__(self, message: str, key: str = ""):
        super().__init__(message)
        self.key = key
