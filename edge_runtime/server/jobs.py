"""A request as the scheduler sees it, and the events it sends back.

The scheduler thread owns every llama.cpp call; the HTTP layer runs on an
asyncio loop. A `Job` carries what to generate one way and an `EventChannel`
carries text, the finish and errors the other way, without blocking either side.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Union

from edge_runtime.core.logprobs import TokenLogprob
from edge_runtime.core.options import GenerationOptions
from edge_runtime.vision.image_input import ImageInput
from edge_runtime.core.stats import GenerationStats
from .errors import ApiError


@dataclass(frozen=True)
class TextDelta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens since the last delta (when the request asked)
    index: int = 0  # the choice (n > 1)
    reasoning: str = ""  # a Thinking model's reasoning since the last delta (not part of `text`)


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" | "length" (StopReason.finish_reason)
    stats: GenerationStats  # the numbers of the answer; stats.usage_body makes OpenAI's usage of them
    logprobs: tuple[TokenLogprob, ...] = ()  # of tokens whose text was never shown (a stop string's)
    index: int = 0  # the choice; the request is done when each of its n choices finished


@dataclass(frozen=True)
class Failed:
    error: ApiError


Event = Union[TextDelta, Finished, Failed]


class EventChannel:
    """Thread -> asyncio queue: `put` from any thread, `get` on the loop that made it."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    async def get(self, timeout: float | None = None) -> Event:
        if timeout is None:
            return await self._queue.get()
        return await asyncio.wait_for(self._queue.get(), timeout)


_ids = itertools.count(1)


@dataclass
class Job:
    """One chat completion: a rendered prompt (media markers in place) and its images."""

    prompt_text: str
    images: list[ImageInput]
    options: GenerationOptions
    seed: int
    deadline: float  # time.monotonic() by which the last token must be out
    channel: EventChannel
    starts_inside_think: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    ignore_eos: bool = False
    cache_prompt: bool = True  # False: the prompt is evaluated whole, none of the slot's cache reused
    n: int = 1  # choices: sequences continuing one evaluated prompt, one slot each
    number: int = field(default_factory=lambda: next(_ids))
    submitted: float = field(default_factory=time.monotonic)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _finished: int = field(default=0, repr=False)  # choices finished

    def cancel(self) -> None:
        """The client is gone: the scheduler drops the job at its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.monotonic()) >= self.deadline

    # Called by the scheduler thread only.
    def emit(self, event: Event) -> None:
        if isinstance(event, Finished):
            self._finished += 1
        if isinstance(event, Failed) or self._finished == self.n:
            self._done.set()
        self.channel.put(event)
