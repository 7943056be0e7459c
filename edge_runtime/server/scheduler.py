"""Continuous batching: one thread owns the llama context and serves every request.

One llama context holds `parallel` sequences (slots). A request waits in a
bounded queue until a slot is free; its prompt is tokenized (with images: on
the vision thread, which also runs the encoder beside this loop) and given the
free slot sharing the longest prefix. Then every step is one llama_decode with
the next token of all generating slots plus one chunk of a prompt being
evaluated (`prefill_chunk` tokens; an image's embeddings go in slices right
after), so a new request, image and all, never stops the running streams for
more than a chunk. Requests join and leave between steps; cancellation is seen
between chunks. Each slot's tokens, positions and sampler are exactly those of
a single-request run, so greedy answers match `VisionChat`'s.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import replace
from typing import Any, Callable

from edge_llama import EmbeddingBatch

from edge_common.manifest import resolve_model_paths

from edge_runtime.core.detokenize import PieceTable
from edge_runtime.core.engine import Engine
from edge_runtime.core.generation import END_OF_TURN, AnswerStep
from edge_runtime.core.open_model import open_engine
from edge_runtime.core.prompt import Piece, Prompt, tokenize_text
from edge_runtime.core.answer_sampler import answer_sampler
from edge_runtime.core.step import Answer, Core
from edge_runtime.errors import DecodeError

from .admission import admit
from .config import ServerOptions
from .errors import ApiError, from_exception, queue_full, shutting_down, timeout_error
from .front import FAILED, LOADING, READY, STOPPED, EngineFront
from .jobs import Failed, Finished, Job, TextDelta
from .logit_bias import end_of_generation_tokens
from .metrics import Gauges, Metrics
from .prefill import VisionWorker
from .prompting import PromptFormat
from .slots import Slot

log = logging.getLogger("edge_runtime.server")


class Scheduler(EngineFront):
    def __init__(self, options: ServerOptions, metrics: Metrics, after_step: Callable[[], None] | None = None) -> None:
        """`after_step`: called by the scheduler thread once a loop iteration's events are emitted (the
        engine process sends them to the HTTP side then, all in one message)."""
        self.options = options
        self.metrics = metrics
        self._after_step = after_step
        self.state = LOADING
        self.error: str | None = None
        self.model_id = options.resolved_model_id()
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._tasks: deque[tuple[Callable[[Engine, list[Slot]], Any], Future]] = deque()
        self._tokenized: deque[tuple[Job, Prompt | None, BaseException | None]] = deque()
        self._preparing = 0  # slots held for jobs taken from the queue, being tokenized (n per job)
        self._reserved = 0  # free slots held for the other choices of n > 1 jobs whose prompt is being evaluated
        self._vision: VisionWorker | None = None
        self._chunk = 64
        self._slots = [Slot(i) for i in range(options.parallel)]
        self._stopping = False
        self._engine: Engine | None = None
        self._format: PromptFormat | None = None
        self._core: Core | None = None  # steps every generating slot, plus a prompt chunk, in one decode
        self._embd_batch: EmbeddingBatch | None = None  # a slice of an image's embeddings
        self._pieces: PieceTable | None = None
        self._eog_tokens: list[int] = []
        self._n_vocab = 0
        self._kv_used = 0
        self._messages_s = 0.0  # spent sending events in the current step
        self._mean_job_s = 1.0
        self._thread = threading.Thread(target=self._main, name="edge-scheduler", daemon=True)

    # ------------------------------------------------------------ called from the HTTP layer

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it at once: 503 while not ready, 429 when the queue is full."""
        with self._cond:
            self.require_ready()
            if self._stopping:
                raise shutting_down()
            if len(self._waiting) >= self.options.queue_size + len(self._free_slots()):
                self.metrics.request("rejected")
                raise queue_full(len(self._waiting), self.options.parallel, self.options.queue_size,
                                 self._retry_after())
            self._waiting.append(job)
            self._cond.notify_all()

    def run_exclusive(self, fn: Callable[[Engine, list[Slot]], Any]) -> Future:
        """Run `fn(engine, free slots)` in the scheduler thread between two decode steps.

        For work on whole sequences (saving or restoring a conversation); the result
        or exception comes back through the returned future.
        """
        future: Future = Future()
        with self._cond:
            self.require_ready()
            if self._stopping:
                raise shutting_down()
            self._tasks.append((fn, future))
            self._cond.notify_all()
        return future

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job (queued or running) and free its slot."""
        if job.done:
            return
        job.cancel()
        with self._cond:
            self._cond.notify_all()

    def gauges(self) -> Gauges:
        engine = self._engine
        cache = engine.encoder_cache if engine is not None and self.state == READY else None
        return Gauges(
            ready=self.state == READY,
            queue_depth=len(self._waiting),
            slots_busy=sum(1 for s in self._slots if s.busy),
            slots_total=len(self._slots),
            kv_used_bytes=self._kv_used,
            kv_total_bytes=engine.kv_cache_bytes if engine is not None and self.state == READY else 0,
            encoder_cache_entries=len(cache) if cache is not None else 0,
            encoder_cache_bytes=cache.nbytes if cache is not None else 0,
        )

    # ------------------------------------------------------------ the scheduler thread

    def _main(self) -> None:
        try:
            self._load()
        except BaseException as exc:  # reported by /health; the HTTP layer keeps answering 503
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = FAILED
            log.error("loading the model failed: %s", self.error)
            return
        try:
            self._loop()
        except BaseException as exc:
            self.error = f"scheduler crashed: {type(exc).__name__}: {exc}"
            self.state = FAILED
            log.exception("the scheduler stopped")
        finally:
            self._shutdown()

    def planner(self):
        """The engine's image planner (None until a vision model is loaded)."""
        engine = self._engine
        return engine.planner() if engine is not None and engine.has_vision else None

    def plan_image(self, detail: str, share: int = 1, need: str = ""):
        """The token budget of one of `share` images at `detail` whose answer has `need` (None until a
        vision model is loaded)."""
        planner = self.planner()
        return planner.plan(detail, share, need) if planner is not None else None

    def _load(self) -> None:
        opts = self.options
        model, mmproj = resolve_model_paths(opts.model_dir, opts.mmproj)
        t0 = time.perf_counter()
        engine, template = open_engine(model, mmproj, opts.engine_options())
        self._engine = engine
        self._format = PromptFormat(template, engine.marker, engine.has_vision, engine.model_path.name)
        self._chunk = opts.prefill_chunk or engine.n_ubatch
        self._core = Core(engine, opts.parallel + engine.n_batch)
        self._embd_batch = EmbeddingBatch(engine.n_batch)
        self._vision = VisionWorker(engine, self._notify) if engine.has_vision else None
        self._pieces = PieceTable(engine.text_model)
        self._eog_tokens = end_of_generation_tokens(engine)
        self._n_vocab = engine.text_model.n_vocab
        self.state = READY
        log.info("model ready in %.1f s: %s, %d slot(s) x %d tokens", time.perf_counter() - t0,
                 self.model_id, opts.parallel, engine.n_ctx_seq)

    def _loop(self) -> None:
        while True:
            started = time.perf_counter()  # a decode step's time runs from here: the loop's work is its cost too
            self._messages_s = 0.0
            with self._cond:
                if not self._has_work():  # woken by a submit, a cancel or the vision thread; at the
                    self._cond.wait(0.5)  # latest after 0.5 s, to drop jobs whose deadline passed
                if self._stopping:
                    return
                tasks, self._tasks = list(self._tasks), deque()
                self._drop_stale_waiting()
            self._run_tasks(tasks)
            with self._cond:
                room = self._room()
                admit = []
                while self._waiting and self._waiting[0].n <= room:  # in order: a job waits for all its slots
                    admit.append(self._waiting.popleft())
                    room -= admit[-1].n
                self._preparing += sum(job.n for job in admit)
                tokenized, self._tokenized = list(self._tokenized), deque()
            for job in admit:
                self._prepare(job)
            for job, prompt, error in tokenized:
                self._preparing -= job.n
                self._assign(job, prompt, error)
            self._reap()
            step = self._step() if self._runnable() else None
            if step is not None:
                self._count_step(*step, time.perf_counter() - started)
            self._send_events(step)

    def _run_tasks(self, tasks: list[tuple[Callable[[Engine, list[Slot]], Any], Future]]) -> None:
        assert self._engine is not None
        for fn, future in tasks:
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(self._engine, self._free_slots()))
            except BaseException as exc:
                future.set_exception(exc)
            finally:
                self._kv_used = self._engine.kv_used_bytes()

    def _has_work(self) -> bool:
        room = bool(self._waiting) and self._waiting[0].n <= self._room()
        return (self._stopping or bool(self._tasks) or bool(self._tokenized) or (bool(self._waiting) and room) or self._runnable()
                or any(s.job.cancelled for s in self._busy() if s.job is not None)
                or any(j.cancelled for j in self._waiting))

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _busy(self) -> list[Slot]:
        return [s for s in self._slots if s.busy]

    def _free_slots(self) -> list[Slot]:
        return [s for s in self._slots if not s.busy]

    def _room(self) -> int:
        """Free slots no admitted job holds (being tokenized, or kept for the choices of an n > 1 job)."""
        return len(self._free_slots()) - self._preparing - self._reserved

    def _generating(self) -> list[Slot]:
        return [s for s in self._slots if s.busy and s.prefill is None]

    def _runnable(self) -> bool:
        """A step can do something: a slot generates, or a prompt has a piece ready (or failed)."""
        for slot in self._busy():
            work = slot.prefill
            if work is None or work.failed is not None or work.current is None or work.current.kind == "text" \
                    or work.embedding(work.current) is not None:
                return True
        return False

    def _drop_stale_waiting(self) -> None:
        now = time.monotonic()
        keep: deque[Job] = deque()
        for job in self._waiting:
            if job.cancelled or job.expired(now):
                self._drop(job)
            else:
                keep.append(job)
        self._waiting = keep

    def _drop(self, job: Job) -> None:
        """End a job that never got a slot: its client left, or its time ran out."""
        if job.cancelled:
            self._end(job, "cancelled", Failed(_cancelled()))
        else:
            self._end(job, "timeout", Failed(timeout_error(self.options.timeout_s)))

    def _prepare(self, job: Job) -> None:
        """Tokenize: text here (the vocab is thread-safe), images on the vision thread."""
        engine = self._engine
        assert engine is not None
        if job.images and self._vision is not None:
            self._vision.tokenize(job, self._on_tokenized)
            return
        try:
            prompt = tokenize_text(engine.text_model, job.prompt_text)
        except BaseException as exc:
            self._on_tokenized(job, None, exc)
            return
        self._on_tokenized(job, prompt, None)

    def _on_tokenized(self, job: Job, prompt: Prompt | None, error: BaseException | None) -> None:
        with self._cond:
            self._tokenized.append((job, prompt, error))
            self._cond.notify_all()

    def _assign(self, job: Job, prompt: Prompt | None, error: BaseException | None) -> None:
        """Give a tokenized prompt the free slot sharing the longest prefix; its images go to the encoder."""
        engine = self._engine
        assert engine is not None and self._pieces is not None
        if prompt is None or job.cancelled or job.expired():
            if prompt is not None:
                prompt.close()
            if error is not None:
                self._fail(job, error)
            else:
                self._drop(job)
            return
        try:
            admitted = admit(engine, job, prompt, self._free_slots(), self._pieces, self._n_vocab, self._eog_tokens,
                             self.options.default_max_tokens)
        # catching Exception: one request's failure (from_exception: its 4xx or a 500) must never stop the scheduler thread
        except Exception as exc:
            self._fail(job, exc)
            return
        answer, work, encode = admitted.answer, admitted.work, admitted.encode
        if encode:
            assert self._vision is not None
            self._vision.encode(work, encode)
        slot = self._slots[answer.seq_id]
        self._reserved += job.n - 1  # the other choices take free slots once the prompt is evaluated
        slot.job, slot.answer, slot.prefill = job, answer, work
        slot.started = time.monotonic()
        self.metrics.add("prompt_tokens", prompt.n_tokens)
        self.metrics.add("prompt_tokens_cached", answer.stats.reused_tokens)
        self.metrics.add("images", prompt.n_images)
        self.metrics.add("images_encoded", len(encode))
        self.metrics.add("encoder_disk_hits", sum(engine.take_disk_hit(c.digest or "") for c in prompt.chunks
                                                  if c.kind == "image" and c.digest in work.embeddings))

    def _fail(self, job: Job, exc: BaseException) -> None:
        error = from_exception(exc)
        self._end(job, "invalid" if error.status < 500 else "error", Failed(error))
        if error.status >= 500:
            log.error("request #%d failed: %s", job.number, error.message)

    def _step(self) -> tuple[int, bool] | None:
        """One core step: the next token of every generating slot plus, when a prompt is being
        evaluated, one chunk of it (text tokens in the same batch, an image slice right after).
        Returns (generated tokens evaluated, whether a prompt piece was) for `_count_step`; None
        when the decode failed (its slots are finished with the error)."""
        engine, core = self._engine, self._core
        assert engine is not None and core is not None
        generating = self._generating()
        budget = min(self._chunk if generating else engine.n_batch, engine.n_batch - len(generating))
        filling, piece = self._next_piece(budget) if budget > 0 else (None, None)
        text = piece if piece is not None and piece.kind == "text" else None
        if generating or text is not None:
            answers = [s.answer for s in generating]
            try:
                shown = core.step(answers, filling.seq_id if text else -1, text.tokens if text else (),  # type: ignore
                                  text is not None and text.final)
            except Exception as exc:  # the engine dropped the step's half-written cells
                log.error("decode step failed: %s", exc)
                core.profile.take()
                for slot in generating + ([filling] if filling is not None else []):
                    self._finish_slot(slot, "error", Failed(from_exception(exc)))
                self._kv_used = engine.kv_used_bytes()
                return None
            for slot, delta in zip(generating, shown):
                self._accept(slot, delta)
        if piece is None:
            self._kv_used = engine.kv_used_bytes()
            return len(generating), False
        assert filling is not None and filling.prefill is not None
        t1 = time.perf_counter()
        try:
            if piece.kind == "image":
                self._decode_image_piece(filling, piece)
            else:
                filling.prefill.advance(piece)
        # catching Exception: one request's failure (from_exception: its 4xx or a 500) must never stop the scheduler thread
        except Exception as exc:
            self._finish_slot(filling, "error", Failed(from_exception(exc)))
        else:
            seconds = time.perf_counter() - t1
            if piece.kind == "image" and not generating and piece.n >= 32:
                engine.measured("prefill", piece.n, seconds)  # alone in its step: this device's prefill rate
            if piece.final:
                self._start_generating(filling, len(generating) + len(piece.tokens) - 1)
        self._kv_used = engine.kv_used_bytes()
        return len(generating), True

    def _send_events(self, step: tuple[int, bool] | None) -> None:
        """Hand this iteration's events to `after_step`, once the step is counted (so the counters sent
        with an answer's end include its last step); the time it takes joins the step's messages."""
        if self._after_step is None:
            return
        t0 = time.perf_counter()
        self._after_step()
        seconds = time.perf_counter() - t0
        if step is None:
            return
        tokens, with_prompt = step
        if tokens:
            self.metrics.add("decode_seconds", seconds)
        if with_prompt:
            self.metrics.add("prefill_seconds", seconds)
        elif tokens:
            self.metrics.add("step_seconds:messages", seconds)

    def _count_step(self, tokens: int, with_prompt: bool, seconds: float) -> None:
        """Count a step of `seconds` (from its loop iteration's start: the loop's own work is part of what
        a step costs) that evaluated `tokens` generated tokens and maybe a prompt piece: a decode step, prefill
        time, or both. A step of generated tokens only is also split into the step profile (the core's parts,
        the messages, the rest as the loop's bookkeeping): its rate is the one to set beside llama.cpp's
        batched decode of the same sequences."""
        assert self._core is not None
        parts = self._core.profile.take()
        if tokens:
            self.metrics.add("decode_steps")
            self.metrics.add("decode_batch_tokens", tokens)
            self.metrics.add("decode_seconds", seconds)
        if with_prompt:
            self.metrics.add("prefill_seconds", seconds)
        if with_prompt or not tokens:
            return
        parts["messages"] = self._messages_s
        parts["bookkeeping"] = max(0.0, seconds - sum(v for k, v in parts.items() if k != "bookkeeping"))
        self.metrics.add("decode_only_steps")
        self.metrics.add("decode_only_tokens", tokens)
        for part, value in parts.items():
            self.metrics.add(f"step_seconds:{part}", value)

    def _next_piece(self, budget: int) -> tuple[Slot | None, Piece | None]:
        """The prompt piece this step evaluates: from the oldest request with one ready."""
        filling = sorted((s for s in self._busy() if s.prefill is not None), key=lambda s: s.started)
        for slot in filling:
            work = slot.prefill
            assert work is not None
            if work.failed is not None:
                self._finish_slot(slot, "error", Failed(from_exception(work.failed)))
                continue
            piece = work.next_piece(budget)
            if piece is not None:
                return slot, piece
        return None, None

    def _decode_image_piece(self, slot: Slot, piece: Piece) -> None:
        engine, work, batch = self._engine, slot.prefill, self._embd_batch
        assert engine is not None and work is not None and batch is not None
        engine.eval_image_piece(batch, work, piece)
        if work.done:  # an image cannot end a prompt (checked at admission); kept for safety
            raise DecodeError("a prompt must end with text (the generation prompt)")

    def _start_generating(self, slot: Slot, index: int) -> None:
        """The prompt is evaluated: sample the first token from its last position's logits. With n > 1,
        the other choices continue copies of the sequence (llama.cpp shares the prompt's cells), each
        with its own sampler, seeded seed + choice, and take their first token from the same logits."""
        work, core, job = slot.prefill, self._core, slot.job
        assert work is not None and core is not None and slot.answer is not None and job is not None
        slot.prefill = None
        work.release()
        try:
            others = self._other_choices(slot) if job.n > 1 else []
        except Exception as exc:  # a choice's sampler or sequence copy failed: the request fails whole
            for other in [s for s in self._slots if s.job is job]:
                self._finish_slot(other, "error", Failed(from_exception(exc)))
            return
        self._accept(slot, core.start(slot.answer, index))
        for other in others:  # the row already holds the bias the first choice's sample added
            self._accept(other, core.start(other.answer, index, biased=True))  # type: ignore[arg-type]

    def _other_choices(self, first: Slot) -> list[Slot]:
        """Give choices 1..n-1 of `first`'s job the slots kept for them, holding a copy of its prompt."""
        engine, job, answer = self._engine, first.job, first.answer
        assert engine is not None and job is not None and answer is not None and self._pieces is not None
        self._reserved -= job.n - 1
        others = sorted(self._free_slots(), key=lambda s: s.last_used)[:job.n - 1]
        for choice, other in enumerate(others, 1):
            step = AnswerStep(self._pieces, job.options, answer.step.limit, job.starts_inside_think,
                              engine.is_end_of_turn)
            stats = replace(answer.stats, image_details=list(answer.stats.image_details), logprobs=[])
            other.job, other.choice, other.started = job, choice, first.started  # a failure below releases it
            sampler = answer_sampler(job.options, engine.text_model, (job.seed + choice) & 0xFFFFFFFF, step)
            other.answer = Answer(other.seq_id, sampler, step, stats, bias=answer.bias,
                                  top_logprobs=answer.top_logprobs)
            engine.copy_sequence(first.seq_id, other.seq_id)
        return others

    def _accept(self, slot: Slot, text: str) -> None:
        """Send what the core's step showed of one slot's token; finish the job once its answer ended."""
        job, answer = slot.job, slot.answer
        assert job is not None and answer is not None
        if answer.step.reason != END_OF_TURN:
            self.metrics.tokens_generated(1)
        reasoning = answer.step.take_reasoning()
        if text or reasoning:
            self._emit(job, TextDelta(text, answer.unsent_logprobs(), slot.choice, reasoning))
        if answer.done:
            self._complete(slot, answer.step.reason.finish_reason)  # type: ignore[union-attr]

    def _complete(self, slot: Slot, reason: str) -> None:
        job, answer = slot.job, slot.answer
        assert job is not None and answer is not None
        tail = answer.step.finish()
        reasoning = answer.step.take_reasoning()
        if tail or reasoning:
            self._emit(job, TextDelta(tail, answer.unsent_logprobs(), slot.choice, reasoning))
        stats = answer.stats
        stats.thinking_tokens = answer.step.thinking_tokens
        elapsed = time.monotonic() - slot.started
        self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * (time.monotonic() - job.submitted)
        log.info("request #%d: prompt %d tok (%d cached) -> %d tok (%s) in %.2f s",
                 job.number, stats.prompt_tokens, stats.reused_tokens, stats.generated_tokens, reason, elapsed)
        self._finish_slot(slot, "ok", Finished(reason, stats, answer.unsent_logprobs(), slot.choice))

    def _reap(self) -> None:
        """Free the slots of cancelled and timed-out jobs."""
        now = time.monotonic()
        for slot in self._busy():
            job = slot.job
            assert job is not None
            if job.cancelled:
                log.info("request #%d cancelled by the client after %d tok", job.number, slot.generated)
                self._finish_slot(slot, "cancelled", Failed(_cancelled()))
            elif job.done:  # another choice of the job failed: the request has its answer (an error)
                self._finish_slot(slot, "error", None)
            elif job.expired(now):
                self._finish_slot(slot, "timeout", Failed(timeout_error(self.options.timeout_s)))

    def _finish_slot(self, slot: Slot, outcome: str, event: Any) -> None:
        job = slot.job
        if slot.prefill is not None and self._engine is not None:  # a prompt half evaluated: drop its cells
            self._engine.truncate(slot.seq_id, len(self._engine.seq_state(slot.seq_id)))
            if job is not None:
                self._reserved -= job.n - 1  # its other choices never start
        slot.release()
        if job is not None and event is not None:
            self._end(job, outcome, event)

    def _end(self, job: Job, outcome: str, event: Finished | Failed) -> None:
        """Send `event`; the request is counted once, when its last choice finished or its first failed."""
        if job.done:  # a choice failed before: the client has its error
            return
        self._emit(job, event)
        if job.done:
            self.metrics.request(outcome)

    def _emit(self, job: Job, event: Any) -> None:
        """Send `event` to the job's client (a message to the HTTP process), timed for the step profile."""
        t0 = time.perf_counter()
        job.emit(event)
        self._messages_s += time.perf_counter() - t0

    def _retry_after(self) -> int:
        return max(1, min(60, math.ceil(self._mean_job_s * (len(self._waiting) + 1) / self.options.parallel)))

    def _shutdown(self) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
            tasks, self._tasks = list(self._tasks), deque()
        for _, future in tasks:
            if future.set_running_or_notify_cancel():
                future.set_exception(shutting_down())
        for job in waiting:
            self._end(job, "error", Failed(shutting_down()))
        for slot in self._busy():
            self._finish_slot(slot, "error", Failed(shutting_down()))
        with self._cond:
            tokenized, self._tokenized = list(self._tokenized), deque()
        for job, prompt, _ in tokenized:
            if prompt is not None:
                prompt.close()
            self._end(job, "error", Failed(shutting_down()))
        self._send_events(None)  # the errors above, also when the loop crashed
        if self._vision is not None:
            self._vision.stop()
        for closing in (self._core, self._embd_batch):
            if closing is not None:
                closing.close()
        if self._engine is not None:
            self._engine.close()
        if self.state == READY:
            self.state = STOPPED


def _cancelled() -> ApiError:
    return ApiError(499, "cancelled by the client", "invalid_request_error", None, "cancelled")
