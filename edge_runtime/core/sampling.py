"""llama.cpp sampler chains (edge_llama's `Sampler`) composed from `GenerationOptions`."""
from __future__ import annotations

import json
from typing import Any, Mapping

from edge_llama import Model, Sampler, json_schema_to_gbnf

from edge_runtime.errors import GrammarError
from edge_runtime.core.options import GenerationOptions


def schema_to_grammar(schema: Mapping[str, Any] | str) -> str:
    """JSON schema -> GBNF, using llama-cpp-python's converter (same as llama.cpp's)."""
    text = schema if isinstance(schema, str) else json.dumps(schema)
    try:
        return json_schema_to_gbnf(text)
    except Exception as exc:  # the converter raises bare exceptions on bad schemas
        raise GrammarError(f"cannot turn this JSON schema into a grammar: {exc}") from exc


def grammar_for(options: GenerationOptions) -> str | None:
    if options.json_schema is not None:
        return schema_to_grammar(options.json_schema)
    return options.grammar


def build_sampler(options: GenerationOptions, model: Model, seed: int) -> Sampler:
    """The chain: grammar first (so top-k keeps only legal tokens), penalties, then pick."""
    chain = Sampler(model)
    try:
        grammar = grammar_for(options)
        if grammar:
            try:
                chain.grammar(grammar)
            except ValueError as exc:  # llama.cpp's parser said no: the caller's `grammar` is at fault
                raise GrammarError(str(exc)) from exc
        if options.repeat_penalty != 1.0 or options.presence_penalty != 0.0 or options.frequency_penalty != 0.0:
            chain.penalties(options.repeat_last_n, options.repeat_penalty, options.frequency_penalty,
                            options.presence_penalty)
        if options.greedy:
            return chain.greedy()
        if options.top_k > 0:
            chain.top_k(options.top_k)
        if options.top_p < 1.0:
            chain.top_p(options.top_p, 1)
        if options.min_p > 0.0:
            chain.min_p(options.min_p, 1)
        return chain.temperature(options.temperature).dist(seed)
    except BaseException:
        chain.close()
        raise
