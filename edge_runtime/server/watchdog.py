"""Stall detection: an engine process that stops reporting is treated as dead.

A frozen process (SIGSTOP, a debugger attached, a native call that never returns
while holding the GIL) keeps its socket open, so the supervisor's `recv` never
sees an end and /health would say "ok" for ever. Once the model is loaded the
engine process sends its counters every 0.1 s from a thread of its own
(`engine_process.StatsPump`), and llama.cpp's compute releases the GIL, so a long
prefill or image encode does not silence it: silence for the configured time
means the process is not running. The supervisor then fails what it held with a
503, kills it, and starts a new one, as it does for a process that died.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

DEFAULT_STALL_TIMEOUT_S = 30.0  # 300 missed reports: never a busy engine, even on a loaded machine


class StallWatch:
    """Calls `on_stall(silent_s)` once when `beat()` has not been called for `timeout_s` while armed.

    Armed only between `arm()` (the engine is ready) and `disarm()` (it ended): a model that is
    still loading sends nothing and is not stalled.
    """

    def __init__(self, timeout_s: float, on_stall: Callable[[float], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self._on_stall = on_stall
        self._clock = clock
        self._last = clock()
        self._armed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-stall-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def beat(self) -> None:
        self._last = self._clock()

    def arm(self) -> None:
        with self._lock:
            self._last = self._clock()
            self._armed = True

    def disarm(self) -> None:
        with self._lock:
            self._armed = False

    def check(self) -> float | None:
        """The silence in seconds if it just passed the limit (and disarm), else None."""
        with self._lock:
            silent = self._clock() - self._last
            if not self._armed or silent < self.timeout_s:
                return None
            self._armed = False
        return silent

    def _run(self) -> None:
        interval = min(1.0, self.timeout_s / 4)
        while not self._stop.wait(interval):
            silent = self.check()
            if silent is not None:
                self._on_stall(silent)
