"""The one llama.cpp / mtmd log callback of the process.

llama.cpp reports why a load failed (and quantization progress, and type
fallbacks) only through its log. One callback routes every line into
`logging` ("edge_llama.llama_cpp"), remembers recent error lines for the
exceptions the layer raises, and feeds the listeners of `capture()` blocks.
"""
from __future__ import annotations

import collections
import ctypes
import logging
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd

_llama_log = logging.getLogger("edge_llama.llama_cpp")

# ggml log levels (ggml.h): NONE, DEBUG, INFO, WARN, ERROR, CONT. llama.cpp talks a
# lot; its failures reach users as exceptions carrying the error lines, so
# nothing here needs to pass logging's default WARNING threshold.
_GGML_TO_LOGGING = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.DEBUG, 4: logging.INFO}
_CONT = 5
ERROR = 4


class LogCapture:
    """What llama.cpp logged inside one `capture()` block."""

    def __init__(self, on_line: Callable[[int, str], None] | None = None):
        self.chunks: list[str] = []
        self.on_line = on_line

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    def errors(self, limit: int = 5) -> str:
        lines = [ln.strip() for ln in self.text.splitlines()]
        keep = [ln for ln in lines if ln and ("error" in ln.lower() or "failed" in ln.lower())]
        return " | ".join(keep[-limit:])


class LogBridge:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._level = 2
        self._partial = ""
        self.errors: collections.deque[str] = collections.deque(maxlen=32)
        self._captures: list[LogCapture] = []
        # Keep a reference: ctypes callbacks are freed with their Python object.
        self._callback = llama_cpp.llama_log_callback(self._on_log)

    def _on_log(self, level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        try:
            chunk = text.decode("utf-8", errors="replace") if text else ""
            with self._lock:
                captures = list(self._captures)
                if level != _CONT:
                    self._level = level
                self._partial += chunk
                done: list[str] = []
                if "\n" in self._partial:
                    *done, self._partial = self._partial.split("\n")
                level_now = self._level
            for cap in captures:
                cap.chunks.append(chunk)
                if cap.on_line is not None:
                    cap.on_line(level, chunk)
            for line in done:
                if not line.strip():
                    continue
                if level_now >= ERROR:
                    self.errors.append(line)
                _llama_log.log(_GGML_TO_LOGGING.get(level_now, logging.DEBUG), "%s", line)
        except Exception:  # a C callback must never raise
            pass

    def install(self) -> None:
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        mtmd.mtmd_log_set(self._callback, ctypes.c_void_p(0))
        mtmd.mtmd_helper_log_set(self._callback, ctypes.c_void_p(0))

    def take_errors(self) -> list[str]:
        with self._lock:
            errors = list(self.errors)
            self.errors.clear()
        return errors

    @contextmanager
    def capture(self, on_line: Callable[[int, str], None] | None = None) -> Iterator[LogCapture]:
        cap = LogCapture(on_line)
        with self._lock:
            self._captures.append(cap)
        try:
            yield cap
        finally:
            with self._lock:
                self._captures.remove(cap)
