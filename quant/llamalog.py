"""Capture llama.cpp's log while one of its calls runs.

llama_model_quantize reports fallbacks and errors only in its log, and
llama-cpp-python prints every line to stderr by default. We swap in a
collecting callback for the duration of a call (restoring whatever was set
before), so errors can be quoted in our exceptions and progress can be shown.
"""
from __future__ import annotations

import ctypes
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

_lock = threading.Lock()  # the logger is process-global


class LogCapture:
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


@contextmanager
def capture(on_line: Callable[[int, str], None] | None = None, *, mtmd: bool = False) -> Iterator[LogCapture]:
    """Collect llama.cpp (and optionally mtmd) log text inside the block."""
    import llama_cpp

    cap = LogCapture(on_line)

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        s = text.decode("utf-8", "replace") if text else ""
        cap.chunks.append(s)
        if cap.on_line is not None:
            cap.on_line(level, s)

    with _lock:
        prev_cb = llama_cpp.llama_log_callback()
        prev_ud = ctypes.c_void_p()
        llama_cpp.llama_log_get(ctypes.byref(prev_cb), ctypes.byref(prev_ud))
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        if mtmd:
            from llama_cpp import mtmd_cpp

            mtmd_cpp.mtmd_log_set(callback, ctypes.c_void_p(0))
            mtmd_cpp.mtmd_helper_log_set(callback, ctypes.c_void_p(0))
        try:
            yield cap
        finally:
            llama_cpp.llama_log_set(prev_cb, prev_ud)
            if mtmd:
                mtmd_cpp.mtmd_log_set(prev_cb, prev_ud)
                mtmd_cpp.mtmd_helper_log_set(prev_cb, prev_ud)
            cap._keepalive = callback  # the C side may still hold the pointer until reset
