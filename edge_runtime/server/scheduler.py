"""Continuous batching: one thread owns the engine and serves every request.

One llama context holds `parallel` sequences (slots). A request waits in a
bounded queue until a slot is free, then its prompt (text and images, through
the engine's encoder cache and prefix reuse) is evaluated in that slot alone,
and from then on every step evaluates the next token of all busy slots in one
llama_decode and samples each slot with its own sampler chain. Requests join
and leave between steps. Because each slot's tokens, positions and sampler are
exactly those of a single-request run, greedy answers match `VisionChat`'s.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable

import llama_cpp

from ..detokenize import PieceTable
from ..engine import Engine
from ..manifest_paths import resolve_model_paths
from ..sampling import Sampler
from ..stats import image_report
from ..template import DEFAULT_QWEN3_VL_TEMPLATE, ChatTemplate
from .batching import TokenBatch
from .config import ServerOptions
from .errors import ApiError, from_exception, shutting_down, timeout_error
from .jobs import Failed, Finished, Job, TextDelta, Usage
from .logit_bias import apply_bias, build_bias, end_of_generation_tokens
from .metrics import Gauges, Metrics
from .prompting import PromptFormat
from .slots import Candidate, Slot, choose_slot
from .textstream import TextPipeline

log = logging.getLogger("edge_runtime.server")

LOADING, READY, FAILED, STOPPED = "loading", "ready", "failed", "stopped"


class Scheduler:
    def __init__(self, options: ServerOptions, metrics: Metrics) -> None:
        self.options = options
        self.metrics = metrics
        self.state = LOADING
        self.error: str | None = None
        self.model_id = options.resolved_model_id()
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._tasks: deque[tuple[Callable[[Engine, list[Slot]], Any], Future]] = deque()
        self._slots = [Slot(i) for i in range(options.parallel)]
        self._stopping = False
        self._engine: Engine | None = None
        self._format: PromptFormat | None = None
        self._batch: TokenBatch | None = None
        self._pieces: PieceTable | None = None
        self._eog_tokens: list[int] = []
        self._n_vocab = 0
        self._kv_used = 0
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

    @property
    def prompt_format(self) -> PromptFormat:
        self.require_ready()
        assert self._format is not None
        return self._format

    def require_ready(self) -> None:
        if self.state == LOADING:
            raise ApiError(503, "the model is still loading; retry shortly", "server_error", None, "model_loading",
                           {"Retry-After": "2"})
        if self.state != READY:
            raise ApiError(503, f"the model is not available: {self.error or self.state}", "server_error", None,
                           "model_unavailable")

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it at once: 503 while not ready, 429 when the queue is full."""
        with self._cond:
            self.require_ready()
            if self._stopping:
                raise shutting_down()
            if len(self._waiting) >= self.options.queue_size + len(self._free_slots()):
                self.metrics.request("rejected")
                raise ApiError(
                    429, f"the server is busy: {len(self._waiting)} request(s) already wait for one of "
                    f"{self.options.parallel} slot(s) (--queue-size {self.options.queue_size}); retry later",
                    "rate_limit_error", None, "queue_full", {"Retry-After": str(self._retry_after())})
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

    def plan_image(self, detail: str):
        """The token budget of one image at `detail` (None until a vision model is loaded)."""
        engine = self._engine
        return engine.plan_image(detail) if engine is not None and engine.has_vision else None

    def _load(self) -> None:
        opts = self.options
        model, mmproj = resolve_model_paths(opts.model_dir, opts.mmproj)
        t0 = time.perf_counter()
        engine = Engine(model, mmproj, opts.engine_options())
        try:
            template = ChatTemplate(
                engine.chat_template or DEFAULT_QWEN3_VL_TEMPLATE,
                bos_token=engine.special_token_text("bos") or "",
                eos_token=engine.special_token_text("eos") or "",
            )
        except BaseException:
            engine.close()
            raise
        self._engine = engine
        self._format = PromptFormat(template, engine.marker, engine.has_vision, engine.model_path.name)
        self._batch = TokenBatch(opts.parallel)
        self._pieces = PieceTable(engine.vocab)
        self._eog_tokens = end_of_generation_tokens(engine)
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(engine.vocab))
        self.state = READY
        log.info("model ready in %.1f s: %s, %d slot(s) x %d tokens", time.perf_counter() - t0,
                 self.model_id, opts.parallel, engine.n_ctx_seq)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._busy() or self._tasks):
                    self._cond.wait()
                if self._stopping:
                    return
                tasks, self._tasks = list(self._tasks), deque()
                self._drop_stale_waiting()
            self._run_tasks(tasks)
            with self._cond:
                admit = [self._waiting.popleft() for _ in range(min(len(self._waiting), len(self._free_slots())))]
            for job in admit:
                self._admit(job)
            self._reap()
            if self._busy():
                self._step()

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

    def _busy(self) -> list[Slot]:
        return [s for s in self._slots if s.busy]

    def _free_slots(self) -> list[Slot]:
        return [s for s in self._slots if not s.busy]

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

    def _admit(self, job: Job) -> None:
        """Evaluate the prompt in the best free slot and sample the first token."""
        engine = self._engine
        assert engine is not None and self._pieces is not None
        if job.cancelled or job.expired():
            self._drop(job)
            return
        sampler = None
        try:
            with engine.tokenize(job.prompt_text, job.images) as prompt:
                room = engine.n_ctx_seq - prompt.n_tokens
                limit = job.options.max_tokens or min(self.options.default_max_tokens, room)
                engine.check_fits(prompt.n_tokens, max(limit, 1))
                bias = build_bias(job.logit_bias, self._n_vocab, job.ignore_eos, self._eog_tokens)
                sampler = Sampler(job.options, engine.vocab, job.seed)
                candidates = [Candidate(s.seq_id, engine.seq_state(s.seq_id).units, s.last_used)
                              for s in self._free_slots()]
                seq_id, _ = choose_slot(candidates, prompt.units)
                t0 = time.perf_counter()
                pre = engine.prefill(prompt, seq_id, reserve=limit)
                images = tuple(image_report(img, c.n_tokens) for img, c in
                               zip(job.images, (c for c in prompt.chunks if c.kind == "image")))
                self.metrics.add("prefill_seconds", time.perf_counter() - t0)
        except Exception as exc:
            if sampler is not None:
                sampler.close()
            error = from_exception(exc)
            self._end(job, "invalid" if error.status < 500 else "error", Failed(error))
            if error.status >= 500:
                log.error("request #%d failed: %s", job.number, error.message)
            return
        finally:
            self._kv_used = engine.kv_used_bytes()
        slot = self._slots[seq_id]
        slot.job, slot.sampler, slot.limit, slot.bias = job, sampler, limit, bias or None
        slot.pipeline = TextPipeline(self._pieces, job.options.stop, job.options.keep_think, job.starts_inside_think)
        slot.prompt_tokens, slot.cached_tokens, slot.started = pre.prompt_tokens, pre.reused_tokens, time.monotonic()
        slot.image_tokens = pre.image_tokens
        slot.images = images
        self.metrics.add("prompt_tokens", pre.prompt_tokens)
        self.metrics.add("prompt_tokens_cached", pre.reused_tokens)
        self.metrics.add("images", pre.images)
        self._accept(slot, self._sample(slot, -1))

    def _step(self) -> None:
        """One llama_decode for all busy slots, then one sample per slot."""
        engine = self._engine
        assert engine is not None and self._batch is not None
        busy = self._busy()
        entries = [(s.seq_id, s.pending) for s in busy]
        t0 = time.perf_counter()
        try:
            self._batch.decode(engine, entries)  # type: ignore[arg-type]
        except Exception as exc:
            log.error("decode step failed: %s", exc)
            for slot in busy:
                self._finish_slot(slot, "error", Failed(from_exception(exc)))
            return
        finally:
            self._kv_used = engine.kv_used_bytes()
        self.metrics.add("decode_steps")
        self.metrics.add("decode_batch_tokens", len(entries))
        for i, slot in enumerate(busy):
            slot.pending = None
            self._accept(slot, self._sample(slot, i))
        self.metrics.add("decode_seconds", time.perf_counter() - t0)

    def _sample(self, slot: Slot, index: int) -> int:
        assert self._engine is not None and slot.sampler is not None
        with self._engine.guarded():  # reading logits waits for RPC workers
            if slot.bias:
                apply_bias(self._engine.ctx, index, slot.bias)
            return slot.sampler.sample(self._engine.ctx, index)

    def _accept(self, slot: Slot, token: int) -> None:
        """What `Engine.decode_tokens` + `VisionChat` do with a sampled token, for one slot."""
        engine, job, pipeline = self._engine, slot.job, slot.pipeline
        assert engine is not None and job is not None and pipeline is not None
        if engine.is_end_of_turn(token):
            self._complete(slot, "stop")
            return
        slot.generated += 1
        self.metrics.tokens_generated(1)
        text = pipeline.feed(token)
        if text:
            job.emit(TextDelta(text))
        if pipeline.stopped:
            self._complete(slot, "stop")
        elif slot.generated >= slot.limit:
            self._complete(slot, "length")
        else:
            slot.pending = token

    def _complete(self, slot: Slot, reason: str) -> None:
        job, pipeline = slot.job, slot.pipeline
        assert job is not None and pipeline is not None
        tail = pipeline.finish()
        if tail:
            job.emit(TextDelta(tail))
        usage = Usage(slot.prompt_tokens, slot.generated, slot.cached_tokens, slot.image_tokens, slot.images)
        elapsed = time.monotonic() - slot.started
        self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * (time.monotonic() - job.submitted)
        log.info("request #%d: prompt %d tok (%d cached) -> %d tok (%s) in %.2f s",
                 job.number, usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens, reason, elapsed)
        self._finish_slot(slot, "ok", Finished(reason, usage))

    def _reap(self) -> None:
        """Free the slots of cancelled and timed-out jobs."""
        now = time.monotonic()
        for slot in self._busy():
            job = slot.job
            assert job is not None
            if job.cancelled:
                log.info("request #%d cancelled by the client after %d tok", job.number, slot.generated)
                self._finish_slot(slot, "cancelled", Failed(_cancelled()))
            elif job.expired(now):
                self._finish_slot(slot, "timeout", Failed(timeout_error(self.options.timeout_s)))

    def _finish_slot(self, slot: Slot, outcome: str, event: Any) -> None:
        job = slot.job
        slot.release()
        if job is not None:
            self._end(job, outcome, event)

    def _end(self, job: Job, outcome: str, event: Finished | Failed) -> None:
        self.metrics.request(outcome)
        job.emit(event)

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
        if self._batch is not None:
            self._batch.close()
        if self._engine is not None:
            self._engine.close()
        if self.state == READY:
            self.state = STOPPED


def _cancelled() -> ApiError:
    return ApiError(499, "cancelled by the client", "invalid_request_error", None, "cancelled")
