"""The sampler of one answer when the model may reason first: grammar for the answer only, forced close tags.

A grammar (json_schema, a forced tool call) constrains the answer, not the reasoning
before it: while the model is inside <think> the free chain samples, and the
constrained chain (a fresh grammar state) takes over at the answer's first token,
as llama.cpp applies a lazy grammar only once its reasoning-budget sampler is idle
or done. A spent thinking budget forces the close tag's tokens, bypassing both chains.
"""
from __future__ import annotations

from edge_llama import Closeable, Context, Model, Sampler

from edge_runtime.core.generation import AnswerStep
from edge_runtime.core.options import GenerationOptions
from edge_runtime.core.sampling import build_sampler


class PhasedSampler(Closeable):
    """Samples for `step`: its forced token, else the free chain while it reasons, else the constrained one."""

    def __init__(self, step: AnswerStep, constrained: Sampler, free: Sampler | None = None) -> None:
        self._step = step
        self._constrained = constrained
        self._free = free

    def sample(self, ctx: Context, idx: int = -1) -> int:
        forced = self._step.forced_token()
        if forced is not None:
            return forced
        chain = self._free if self._free is not None and self._step.thinking else self._constrained
        return chain.sample(ctx, idx)

    @property
    def is_argmax(self) -> bool:
        """True while the next token is the chain's greedy pick: no forced close tag pending and the chain
        in charge greedy alone, so the core may take it with one argmax over the step's logits block."""
        if self._step.forcing:
            return False
        chain = self._free if self._free is not None and self._step.thinking else self._constrained
        return chain.is_argmax

    def close(self) -> None:
        for chain in (self._free, self._constrained):
            if chain is not None:
                chain.close()


def answer_sampler(options: GenerationOptions, model: Model, seed: int, step: AnswerStep) -> PhasedSampler:
    """The chains of `options` for `step`'s answer; a bad grammar is refused here (GrammarError)."""
    constrained = build_sampler(options, model, seed)
    free = None
    try:
        if step.thinking and (options.grammar is not None or options.json_schema is not None):
            free = build_sampler(options.updated({"grammar": None, "json_schema": None}), model, seed)
    except BaseException:
        constrained.close()
        raise
    return PhasedSampler(step, constrained, free)
