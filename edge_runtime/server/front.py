"""What the HTTP routes see of an engine, wherever it runs: its state and how to render prompts for it.

The routes talk to a `Scheduler` in this process or to an `EngineHost` whose scheduler runs in a
child process; both answer through this face, so a route never asks which.
"""
from __future__ import annotations

from .errors import unavailable
from .prompting import PromptFormat

LOADING, READY, FAILED, STOPPED = "loading", "ready", "failed", "stopped"


class EngineFront:
    """What the routes read of an engine, whether it runs here (`Scheduler`) or in a child
    process (`EngineHost`): its state and, once ready, how to render prompts for it."""

    state: str = LOADING
    error: str | None = None
    last_exit: str | None = None  # why the engine process last died, if it did
    _format: PromptFormat | None = None

    @property
    def prompt_format(self) -> PromptFormat:
        self.require_ready()
        assert self._format is not None
        return self._format

    def require_ready(self) -> None:
        error = unavailable(self.state, self.error, self.last_exit)
        if error is not None:
            raise error
