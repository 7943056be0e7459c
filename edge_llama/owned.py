"""Ownership of a C pointer: freed once, on close(), `with` exit or collection."""
from __future__ import annotations

from typing import Any


class Closeable:
    """close() on `with` exit and when collected; close() must be idempotent."""

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        # catching Exception: __del__ must not raise (Python only prints it); close() is called explicitly on every normal path
        except Exception:
            pass


class Owned(Closeable):
    """Frees its pointer once."""

    ptr: Any = None

    def _free(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self._free()
            self.ptr = None
