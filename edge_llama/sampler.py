"""llama.cpp sampler chains and grammars, wrapped once; the runtime composes a chain from its options.

The chain owns every sampler added to it (llama_sampler_chain_add), so a
sampler joins the chain as soon as it exists and the chain's free releases
all. The JSON-schema -> GBNF converters are llama-cpp-python's ports of
llama.cpp's own (json-schema-to-grammar), re-exported from here so nothing
above edge_llama imports llama_cpp.
"""
from __future__ import annotations

from typing import Any

import llama_cpp as L
from llama_cpp.llama_grammar import JSON_GBNF, SchemaConverter, json_schema_to_gbnf

from .backend import take_errors
from .errors import LlamaError
from .objects import Context, Model
from .owned import Owned

__all__ = ["JSON_GBNF", "Sampler", "SchemaConverter", "json_schema_to_gbnf"]


class Sampler(Owned):
    """One llama.cpp sampler chain; add samplers in the order they run, then `sample`."""

    def __init__(self, model: Model):
        self.model = model
        self.stages: list[str] = []  # the samplers added, by name, in order
        params = L.llama_sampler_chain_default_params()
        params.no_perf = True
        self.ptr = L.llama_sampler_chain_init(params)
        if not self.ptr:
            raise LlamaError("llama.cpp could not create a sampler chain")

    def _free(self) -> None:
        L.llama_sampler_free(self.ptr)

    def _add(self, sampler: Any, stage: str) -> "Sampler":
        L.llama_sampler_chain_add(self.ptr, sampler)
        self.stages.append(stage)
        return self

    @property
    def is_argmax(self) -> bool:
        """The chain is greedy alone: it picks the first highest logit and keeps no state (llama.cpp's
        greedy sampler), so a caller may pick the same token with an argmax over many rows at once."""
        return self.stages == ["greedy"]

    def grammar(self, gbnf: str, root: str = "root") -> "Sampler":
        take_errors()
        sampler = L.llama_sampler_init_grammar(self.model.vocab, gbnf.encode("utf-8"), root.encode())
        if not sampler:
            # a plain ValueError: the runtime's one caller turns it into GrammarError (core/sampling.py)
            raise ValueError(f"invalid grammar: {'; '.join(take_errors()) or 'llama.cpp could not parse it'}")
        return self._add(sampler, "grammar")

    def penalties(self, last_n: int, repeat: float, frequency: float, presence: float) -> "Sampler":
        return self._add(L.llama_sampler_init_penalties(self.model.n_vocab, last_n, repeat, frequency, presence),
                         "penalties")

    def greedy(self) -> "Sampler":
        return self._add(L.llama_sampler_init_greedy(), "greedy")

    def top_k(self, k: int) -> "Sampler":
        return self._add(L.llama_sampler_init_top_k(k), "top_k")

    def top_p(self, p: float, min_keep: int = 1) -> "Sampler":
        return self._add(L.llama_sampler_init_top_p(p, min_keep), "top_p")

    def min_p(self, p: float, min_keep: int = 1) -> "Sampler":
        return self._add(L.llama_sampler_init_min_p(p, min_keep), "min_p")

    def temperature(self, t: float) -> "Sampler":
        return self._add(L.llama_sampler_init_temp(t), "temperature")

    def dist(self, seed: int) -> "Sampler":
        return self._add(L.llama_sampler_init_dist(seed & 0xFFFFFFFF), "dist")

    def sample(self, ctx: Context, idx: int = -1) -> int:
        """Sample from the logits of batch output `idx` and accept the token."""
        return int(L.llama_sampler_sample(self.ptr, ctx.ptr, idx))
