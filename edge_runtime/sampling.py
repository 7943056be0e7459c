"""llama.cpp sampler chains built from `GenerationOptions`."""
from __future__ import annotations

import json
from typing import Any, Iterator, Mapping

import llama_cpp
from llama_cpp.llama_grammar import json_schema_to_gbnf

from edge_llama import take_errors
from .errors import GrammarError
from .options import GenerationOptions


def schema_to_grammar(schema: Mapping[str, Any] | str) -> str:
    """JSON schema -> GBNF, using llama-cpp-python's converter (same as llama.cpp's)."""
    text = schema if isinstance(schema, str) else json.dumps(schema)
    try:
        return json_schema_to_gbnf(text)
    except Exception as exc:  # the converter raises bare exceptions on bad schemas
        raise ValueError(f"cannot turn this JSON schema into a grammar: {exc}") from exc


def grammar_for(options: GenerationOptions) -> str | None:
    if options.json_schema is not None:
        return schema_to_grammar(options.json_schema)
    return options.grammar


class Sampler:
    """Owns one llama.cpp sampler chain; free it with `close()` or `with`."""

    def __init__(self, options: GenerationOptions, vocab: Any, seed: int) -> None:
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        self._chain = llama_cpp.llama_sampler_chain_init(params)
        try:
            for sampler in _samplers(options, vocab, seed):
                llama_cpp.llama_sampler_chain_add(self._chain, sampler)
        except BaseException:
            self.close()
            raise

    @property
    def handle(self) -> Any:
        return self._chain

    def sample(self, ctx: Any, idx: int = -1) -> int:
        """Sample from the logits at batch index `idx` and accept the token."""
        return int(llama_cpp.llama_sampler_sample(self._chain, ctx, idx))

    def close(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None

    def __enter__(self) -> "Sampler":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _samplers(options: GenerationOptions, vocab: Any, seed: int) -> Iterator[Any]:
    """The chain: grammar first (so top-k keeps only legal tokens), penalties, then pick.

    A generator, so each sampler joins the chain (which owns it) as soon as it exists.
    """
    grammar = grammar_for(options)
    if grammar:
        take_errors()
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            detail = "; ".join(take_errors()) or "llama.cpp could not parse it"
            raise GrammarError(f"invalid grammar: {detail}")
        yield sampler
    if (
        options.repeat_penalty != 1.0
        or options.presence_penalty != 0.0
        or options.frequency_penalty != 0.0
    ):
        yield (
            llama_cpp.llama_sampler_init_penalties(
                llama_cpp.llama_vocab_n_tokens(vocab),
                options.repeat_last_n,
                options.repeat_penalty,
                options.frequency_penalty,
                options.presence_penalty,
            )
        )
    if options.greedy:
        yield llama_cpp.llama_sampler_init_greedy()
        return
    if options.top_k > 0:
        yield llama_cpp.llama_sampler_init_top_k(options.top_k)
    if options.top_p < 1.0:
        yield llama_cpp.llama_sampler_init_top_p(options.top_p, 1)
    if options.min_p > 0.0:
        yield llama_cpp.llama_sampler_init_min_p(options.min_p, 1)
    yield llama_cpp.llama_sampler_init_temp(options.temperature)
    yield llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF)
