"""A tokenized request made ready for a slot, before it takes one.

Admission checks the prompt against the context, builds its logit bias and sampler (a bad
grammar is refused here), picks the free slot sharing the longest prefix, plans how much
of that slot's KV cache is reused (dropping the rest), and lists the images the encoder
still has to run on. A refused request leaves every slot as it was and closes what was
built for it, its prompt included.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from edge_runtime.core.detokenize import PieceTable
from edge_runtime.core.engine import Engine
from edge_runtime.core.generation import AnswerStep
from edge_runtime.core.kv_state import plan_reuse
from edge_runtime.core.prompt import Chunk, Prompt
from edge_runtime.core.answer_sampler import answer_sampler
from edge_runtime.core.stats import image_report
from edge_runtime.core.step import Answer
from edge_runtime.errors import DecodeError

from .jobs import Job
from .logit_bias import build_bias
from .prefill import PrefillWork, missing_images
from .slots import Candidate, Slot, choose_slot


@dataclass
class Admitted:
    """What a slot starts with: the answer (its stats' prompt part filled in), the prompt's cursor
    from the first unit not reused, and the image chunks to hand to the encoder."""

    answer: Answer
    work: PrefillWork
    encode: list[Chunk]


def admit(engine: Engine, job: Job, prompt: Prompt, free: Sequence[Slot], pieces: PieceTable, n_vocab: int,
          eog_tokens: list[int], default_max_tokens: int) -> Admitted:
    """Make `prompt` ready for one of the `free` slots; on refusal the error is raised and the prompt closed."""
    sampler = answer = work = None
    try:
        if not prompt.chunks or prompt.chunks[-1].kind != "text":
            raise DecodeError("a prompt must end with text (the generation prompt)")
        room = engine.n_ctx_seq - prompt.n_tokens
        limit = job.options.max_tokens or min(default_max_tokens, room)
        engine.check_fits(prompt.n_tokens, max(limit, 1))
        bias = build_bias(job.logit_bias, n_vocab, job.ignore_eos, eog_tokens)
        step = AnswerStep(pieces, job.options, limit, job.starts_inside_think, engine.is_end_of_turn)
        sampler = answer_sampler(job.options, engine.text_model, job.seed, step)  # a bad grammar fails here
        candidates = [Candidate(s.seq_id, engine.seq_state(s.seq_id).units, s.last_used) for s in free]
        seq_id, _ = choose_slot(candidates, prompt.units)
        answer = Answer(seq_id, sampler, step, bias=bias or None, top_logprobs=job.options.top_logprobs)
        sampler = None
        keep = plan_reuse(engine.seq_state(seq_id), prompt.units) if job.cache_prompt else 0
        engine.truncate(seq_id, keep)
        work = PrefillWork(prompt, seq_id, keep, job=job)
        encode = missing_images(work, engine)
    except BaseException:
        for owner in (sampler, answer):
            if owner is not None:
                owner.close()
        if work is not None:
            work.release()
        else:
            prompt.close()
        raise
    stats = answer.stats
    stats.prompt_tokens, stats.image_tokens, stats.images = prompt.n_tokens, prompt.n_image_tokens, prompt.n_images
    stats.reused_tokens = sum(u.n_tokens for u in prompt.units[:keep])
    stats.image_details = [image_report(img, c.n_tokens) for img, c in
                           zip(job.images, (c for c in prompt.chunks if c.kind == "image"))]
    return Admitted(answer, work, encode)
