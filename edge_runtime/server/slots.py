"""Slots: one KV-cache sequence each, holding a request while it runs and its
conversation afterwards, so a follow-up that repeats the history starts where it ended."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

from edge_runtime.core.step import Answer
from edge_runtime.core.kv_state import Unit, common_prefix
from .jobs import Job
from .prefill import PrefillWork


@dataclass
class Slot:
    seq_id: int
    last_used: float = 0.0
    job: Job | None = None
    answer: Answer | None = None  # sampler, per-token step and stats: what the core steps, as VisionChat's
    prefill: PrefillWork | None = None  # the prompt still being evaluated (None: generating)
    started: float = 0.0
    choice: int = 0  # which of the job's n choices this slot answers

    @property
    def generated(self) -> int:
        return self.answer.step.generated if self.answer is not None else 0

    @property
    def busy(self) -> bool:
        return self.job is not None

    def release(self) -> None:
        """Free the slot for the next request; its KV cache (the conversation) stays."""
        if self.answer is not None:
            self.answer.close()
        if self.prefill is not None:
            self.prefill.release()
        self.job = self.answer = self.prefill = None
        self.choice = 0
        self.last_used = time.monotonic()


@dataclass(frozen=True)
class Candidate:
    seq_id: int
    units: Sequence[Unit]  # what the slot's KV cache holds
    last_used: float


def choose_slot(candidates: Sequence[Candidate], wanted: Sequence[Unit]) -> tuple[int, int]:
    """(seq_id, shared units): the free slot sharing the longest prefix with `wanted`.

    Ties go to the slot holding least (then the least recently used), so a
    conversation cached elsewhere survives for its own follow-up.
    """
    if not candidates:
        # a plain ValueError: the scheduler takes a slot only when one is free: a programming error
        raise ValueError("no free slot")
    best = max(candidates, key=lambda c: (common_prefix(c.units, wanted), -len(c.units), -c.last_used))
    return best.seq_id, common_prefix(best.units, wanted)
