"""The engine: a text GGUF + projector through edge_llama, with KV reuse.

One `Engine` owns a llama model, one llama context (its KV cache holds up to
`n_seq_max` sequences) and, for vision models, an mtmd context. For each
sequence it remembers which units (text tokens, images by content hash) are in
the KV cache, so `prefill` evaluates only what follows the longest common
prefix. Encoder outputs are kept in a byte-bounded LRU cache (and on disk) so
another conversation about the same image skips the vision encoder.

Each operation exists once and both clients use it: `eval_tokens` (tokens of
one or many sequences in one decode), `eval_image_piece` (a slice of an image's
embeddings), `encode_chunk` (the vision encoder, feeding both caches), `sample`;
the bookkeeping of every sequence is kept by them alone. `prefill` takes a
prompt's pieces one after the other (VisionChat); the server's scheduler takes
one a step between the other slots' tokens, through `core.Core`.

The engine is not thread-safe; callers serialise access (VisionChat holds a lock).
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edge_common.preflight import projector_problems
from edge_llama import (FLASH_ATTN_AUTO, FLASH_ATTN_ON, Batch, Closeable, Context, ContextOptions, EmbeddingBatch,
                        LlamaError, LlamaLoadError, LoadOptions, Model, Projector, ProjectorOptions, Sampler,
                        default_marker, ensure_backend, image_grid, image_positions, kv_type, log_suffix,
                        physical_cores, take_errors)
from edge_llama.graph_watch import GraphWatch
from edge_llama.offload import projector_free_bytes, projector_on_gpu, resolve_flash_attn, resolve_gpu_layers
from edge_llama.params import resolve_mmap, resolve_ubatch
from edge_llama.placement import Placement, place
from edge_llama.rpc import DecodeWatchdog, placement_from_log, unguard_workers
from edge_models import chat_format

from edge_runtime.vision.disk_cache import DiskEncoderCache, projector_sha256
from edge_runtime.vision.encoder_cache import EncoderCache
from edge_runtime.vision.image_budget import (HIGH_MAX_TOKENS, DeviceCost, ImagePlan, Planner, cost_key, device_key, load_cost,
                           save_cost, text_flops_per_token)
from edge_runtime.errors import (
    ContextOverflowError,
    DecodeError,
    EngineClosedError,
    ModelFileError,
    ModelLoadError,
    ProjectorMismatchError,
    SavedConversationError,
    VisionUnsupportedError,
)
from edge_runtime.core.kv_state import SeqState, Unit, image_unit, plan_reuse, text_units
from edge_runtime.core.options import EngineOptions
from edge_runtime.core.prompt import Chunk, ImageInput, Piece, Prompt, PromptCursor, tokenize_multimodal, tokenize_text
from edge_runtime.chat.saved_conversation import StateFingerprint, file_sha256
from edge_runtime.core.stats import GenerationStats
from edge_runtime.vision.vision_spec import read_vision_spec

log = logging.getLogger("edge_runtime")


def _check_file(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"{what} not found: {p}")
    return p


class Engine(Closeable):
    """A text GGUF and its projector loaded once, serving any number of prompts on its sequences.

    `VisionChat` and edge-serve build on it; use it directly only for what they do not offer.
    It remembers what each KV-cache sequence holds, so a prompt sharing a prefix with the last
    one evaluates only what is new.
    """

    def __init__(
        self, model_path: str | Path, mmproj_path: str | Path | None = None, options: EngineOptions | None = None
    ) -> None:
        self.options = options or EngineOptions()
        self.model_path = _check_file(model_path, "text model GGUF")
        self.mmproj_path = _check_file(mmproj_path, "projector GGUF") if mmproj_path else None
        ensure_backend()
        self._model: Any = None  # the text model's pointer: None once closed
        # The mtmd context is not thread-safe: tokenizing and encoding take this lock, so a
        # caller on another thread (the server's vision thread vs. a conversation save on the
        # scheduler thread) waits instead of racing. Re-entrant: prefill encodes under it.
        self.mtmd_lock = threading.RLock()
        # the image encoder's graph: timed inside encoder_watch.timing(), stoppable inside .stopping()
        self.encoder_watch: GraphWatch | None = None
        self._cost_lock = threading.Lock()
        self.placement: Placement | None = None
        self._watchdog: DecodeWatchdog | None = None
        self._lmodel: Model | None = None
        self._lctx: Context | None = None
        self._lproj: Projector | None = None
        self._lbatch: Batch | None = None
        self._lembd: EmbeddingBatch | None = None
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ loading

    def _load(self) -> None:
        opts = self.options
        type_k, type_v = kv_type(opts.kv_cache_type_k), kv_type(opts.kv_cache_type_v)
        self.flash_attn_type = resolve_flash_attn(opts.flash_attn, type_v)
        self.n_gpu_layers = resolve_gpu_layers(opts.n_gpu_layers)
        self.threads = opts.threads or physical_cores()

        # layers on a local GPU (not on RPC workers) decide mmap and ubatch
        local_gpu_layers = self.n_gpu_layers
        if opts.rpc_servers:
            self.placement = place(self.model_path, opts.rpc_servers, opts.tensor_split, opts.rpc_timeout_s,
                                   opts.rpc_output_on_host)
            self.n_gpu_layers = self.placement.plan.n_gpu_layers
            local_gpu_layers = 0 if self.placement.local_cpu else -1
            self._watchdog = DecodeWatchdog(opts.rpc_stall_s)
        self.mmap = resolve_mmap(opts.mmap, local_gpu_layers, opts.repack)
        load = LoadOptions(self.n_gpu_layers, mmap=self.mmap, repack=opts.repack, amx=opts.amx,
                           placement=self.placement)
        try:
            self._lmodel = Model(self.model_path, load)
        except LlamaLoadError as exc:
            raise ModelLoadError(str(exc)) from exc
        self.weights_how = self._lmodel.how
        self._model = self._lmodel.ptr
        # {device: (layers, weight bytes)} as llama.cpp placed them
        self.device_weights = placement_from_log(self._lmodel.load_log,
                                                 self.placement.buffer_devices() if self.placement else None)
        if self.placement is not None:
            log.info("layers and weights per device: %s", self.placement.describe(self.device_weights))
        self.arch = self.meta("general.architecture") or ""
        cparams = ContextOptions(
            n_ctx=opts.n_ctx, n_batch=opts.n_batch, n_ubatch=resolve_ubatch(opts.n_ubatch, opts.n_batch, local_gpu_layers),
            n_seq_max=opts.n_seq_max, n_threads=self.threads, type_k=type_k.ggml_type, type_v=type_v.ggml_type,
            flash_attn=self.flash_attn_type)
        try:
            self._lctx = Context(self._lmodel, cparams)
        except LlamaLoadError as exc:
            raise ModelLoadError(
                f"llama.cpp could not create a context (n_ctx={opts.n_ctx}, K={type_k.name}, V={type_v.name}, "
                f"flash_attn={opts.flash_attn!r})" + (": " + " | ".join(exc.log_lines[-3:]) if exc.log_lines else "")
            ) from exc
        self.marker = default_marker()
        self.n_ctx = self._lctx.n_ctx
        self.n_ctx_seq = self._lctx.n_ctx_seq
        self.n_batch = self._lctx.n_batch
        self.n_ubatch = self._lctx.n_ubatch
        self._lbatch = Batch(self.n_batch)  # prefill's text pieces
        self._lembd = EmbeddingBatch(self.n_batch)  # prefill's image slices
        self.n_embd_inp = self._lmodel.n_embd_inp
        self._kv_token_bytes = self._kv_bytes_per_token(type_k, type_v)

        if self.mmproj_path is not None:
            self._load_projector()

        self._seqs: dict[int, SeqState] = {}
        self.encoder_cache = EncoderCache(opts.encoder_cache_bytes)
        self.disk_cache: DiskEncoderCache | None = None
        self._disk_hits: set[str] = set()
        if self.mmproj_path is not None:
            self._init_image_costs()
        self._eot = self._end_of_turn_tokens()
        log.info(
            "loaded %s (%s)%s: n_ctx=%d, KV %s/%s, flash_attn=%s, gpu_layers=%d, threads=%d, "
            "n_batch=%d/%d, weights %s",
            self.model_path.name,
            self.arch,
            f" + {self.mmproj_path.name}" if self.mmproj_path else "",
            self.n_ctx,
            type_k.name,
            type_v.name,
            {-1: "auto", 0: "off", 1: "on"}.get(self.flash_attn_type, self.flash_attn_type),
            self.n_gpu_layers,
            self.threads,
            self.n_batch,
            self.n_ubatch,
            self.weights_how,
        )

    def _load_projector(self) -> None:
        problems = projector_problems(self.mmproj_path)
        if problems:
            raise ModelLoadError(f"projector {self.mmproj_path}: " + "; ".join(problems))
        opts = self.options
        use_gpu = projector_on_gpu(opts.mmproj_gpu, self.n_gpu_layers)
        if self.flash_attn_type == FLASH_ATTN_AUTO and not use_gpu:
            # mtmd resolves "auto" only in its warm-up, which the CPU skips: without this the
            # projector would run without flash attention (slower, and O(patches^2) memory).
            flash = FLASH_ATTN_ON
        else:
            flash = self.flash_attn_type
        self.vision = read_vision_spec(self.mmproj_path)
        self.projector_gpu = bool(use_gpu)
        # Images are resized here (HF's processor, per-image budgets) to sizes mtmd keeps as
        # they are: its own bounds only need to admit every budget this engine may choose.
        params = ProjectorOptions(
            n_threads=self.threads, use_gpu=bool(use_gpu), image_min_tokens=1,
            image_max_tokens=max(self.vision.max_tokens, HIGH_MAX_TOKENS, opts.image_max_tokens or 0),
            flash_attn=flash, warmup=bool(use_gpu),  # on CPU a warm-up encode only delays start-up
            watch=True)
        try:
            self._lproj = Projector(self.mmproj_path, self._lmodel, params)
        except LlamaLoadError as exc:
            mismatch = next((e for e in exc.log_lines if "mismatch between text model" in e), None)
            if mismatch:
                raise ProjectorMismatchError(
                    f"projector {self.mmproj_path.name} does not fit text model {self.model_path.name}: "
                    f"{mismatch.split(': error: ')[-1].strip()} (text model expects "
                    f"{self.n_embd_inp}-wide image embeddings); use the mmproj converted with this model"
                ) from exc
            raise ModelLoadError(str(exc)) from exc
        self.encoder_watch = self._lproj.watch
        if not self._lproj.supports_vision:
            raise ModelLoadError(f"{self.mmproj_path.name} has no vision encoder")

    def _init_image_costs(self) -> None:
        opts = self.options
        self._cost_dir = Path(opts.cost_cache_dir).expanduser() if opts.cost_cache_dir else None
        self._cost_key = cost_key(self.model_path, self.mmproj_path,
                                  device_key(self.threads, self.projector_gpu, self.n_gpu_layers))
        self.cost: DeviceCost = load_cost(self._cost_dir, self._cost_key, self.projector_gpu, self.vision.signature)
        self.text_flops_per_token = text_flops_per_token(self._lmodel.n_params, self._lmodel.n_vocab,
                                                         self._lmodel.n_embd)
        self.vision_free_bytes = projector_free_bytes(self.projector_gpu)
        if opts.encoder_cache_dir:
            root = Path(opts.encoder_cache_dir).expanduser()
            root.mkdir(parents=True, exist_ok=True)
            sha = projector_sha256(self.mmproj_path, root)
            self.disk_cache = DiskEncoderCache(root, sha, opts.encoder_cache_disk_bytes)

    def planner(self) -> Planner:
        """This engine's image budgets as they stand (the cost model moves once, on the first measurement)."""
        opts = self.options
        return Planner(self.vision, self.n_ctx_seq, replace(self.cost), self.text_flops_per_token,
                       opts.image_latency_s, opts.image_min_tokens, opts.image_max_tokens, self.vision_free_bytes)

    def plan_image(self, detail: str = "auto", share: int = 1) -> ImagePlan:
        """The token budget for one of `share` images of a message at `detail`."""
        return self.planner().plan(detail, share)

    def _kv_bytes_per_token(self, type_k: Any, type_v: Any) -> int:
        """K+V bytes one token occupies across all layers (matches llama.cpp's allocation)."""
        m = self._lmodel
        n_layer, n_head, n_head_kv, n_embd = m.n_layer, m.n_head, m.n_head_kv, m.n_embd
        head_k = int(self.meta(f"{self.arch}.attention.key_length") or n_embd // max(n_head, 1))
        head_v = int(self.meta(f"{self.arch}.attention.value_length") or head_k)
        return n_layer * (type_k.row_bytes(n_head_kv * head_k) + type_v.row_bytes(n_head_kv * head_v))

    def _end_of_turn_tokens(self) -> frozenset[int]:
        """EOG tokens plus the template's end-of-turn token if the vocab forgot to flag it."""
        extra = set()
        for text in chat_format(self.arch).end_of_turn:
            ids = self._lmodel.tokenize(text, add_special=False)
            if len(ids) == 1:
                extra.add(ids[0])
        return frozenset(extra)

    # ------------------------------------------------------------ metadata

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value of the text model as a string (None if absent)."""
        self._require_open()
        return self._lmodel.meta(key)

    @property
    def chat_template(self) -> str | None:
        """The GGUF's Jinja chat template (None when the file has none): prompts must be rendered with it."""
        return self._lmodel.chat_template

    def special_token_text(self, which: str) -> str | None:
        """Text of the "bos" or "eos" token, for chat templates that mention them."""
        return self._lmodel.special_token_text(which)

    @property
    def has_vision(self) -> bool:
        """Whether a projector is loaded: without one, image prompts are refused."""
        return self._lproj is not None

    @property
    def text_model(self) -> Model:
        """The text model (tokenizer, pieces, vocab size) as edge_llama wraps it."""
        self._require_open()
        assert self._lmodel is not None
        return self._lmodel

    @property
    def context(self) -> Context:
        """The llama context (logits, KV cells); one thread at a time."""
        self._require_open()
        assert self._lctx is not None
        return self._lctx

    @property
    def uses_mrope(self) -> bool:
        """Image tokens take M-RoPE positions (t, y, x, z) rather than one running position."""
        return self._lproj is not None and self._lproj.uses_mrope

    def truncate(self, seq_id: int, keep: int) -> None:
        """Keep the first `keep` units of sequence `seq_id` (cells past them, even half-written, go)."""
        self._truncate(seq_id, self._seq(seq_id), keep)

    @staticmethod
    def take_log_errors() -> list[str]:
        """llama.cpp's recent error lines, consumed, so a failure can say what llama.cpp said."""
        return take_errors()

    @staticmethod
    def log_suffix() -> str:
        """': <recent llama.cpp errors>' for an exception message, or ''."""
        return _log_suffix()

    def is_end_of_turn(self, token: int) -> bool:
        """Whether generation should stop here: any end-of-generation token, or the template's end of turn."""
        return token in self._eot or self._lmodel.is_eog(token)

    # ------------------------------------------------------------ KV accounting

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes allocated for K and V (n_ctx cells)."""
        return self._kv_token_bytes * self.n_ctx

    def kv_used_bytes(self, seq_id: int | None = None) -> int:
        """KV bytes holding one sequence (all of them with None): what a conversation costs in memory."""
        seqs = self._seqs.values() if seq_id is None else [self._seq(seq_id)]
        return self._kv_token_bytes * sum(s.n_tokens for s in seqs)

    def seq_state(self, seq_id: int = 0) -> SeqState:
        """What sequence `seq_id` holds (tokens and images), which decides what a new prompt reuses."""
        return self._seq(seq_id)

    def _seq(self, seq_id: int) -> SeqState:
        if not 0 <= seq_id < self.options.n_seq_max:
            raise ValueError(f"seq_id {seq_id} outside [0, n_seq_max={self.options.n_seq_max})")
        return self._seqs.setdefault(seq_id, SeqState())

    def reset(self, seq_id: int = 0) -> None:
        """Forget sequence `seq_id` (its KV cells are freed)."""
        self._require_open()
        self._lctx.seq_rm(seq_id, -1, -1)
        self._seq(seq_id).clear()

    # ------------------------------------------------------------ saved sequences

    def fingerprint(self) -> StateFingerprint:
        """What this engine's KV cells depend on (the model files are hashed once per process)."""
        self._require_open()
        opts = self.options
        return StateFingerprint(
            model_sha256=file_sha256(self.model_path),
            mmproj_sha256=file_sha256(self.mmproj_path) if self.mmproj_path else None,
            arch=self.arch,
            kv_type_k=kv_type(opts.kv_cache_type_k).name,
            kv_type_v=kv_type(opts.kv_cache_type_v).name,
            image_min_tokens=opts.image_min_tokens,
            image_max_tokens=opts.image_max_tokens,
            kv_streams=opts.n_seq_max,
        )

    def export_seq(self, seq_id: int = 0) -> tuple[list[Unit], bytearray]:
        """The units `seq_id` holds and llama.cpp's serialised cells of it."""
        self._require_open()
        return list(self._seq(seq_id).units), self._lctx.seq_state_bytes(seq_id)

    def import_seq(self, seq_id: int, units: Sequence[Unit], data: bytearray) -> None:
        """Put exported cells into `seq_id` and take `units` as its bookkeeping, so the
        next prefill reuses them. On refusal the sequence is left empty."""
        self._require_open()
        self.check_fits(sum(u.n_tokens for u in units), 0)
        state = self._seq(seq_id)
        state.clear()
        if not self._lctx.load_seq_state(seq_id, data):
            self._lctx.seq_rm(seq_id, -1, -1)
            raise SavedConversationError(
                "llama.cpp refused the saved KV cells (another layer count, KV type, or flash-attention "
                "setting, which changes the V layout)" + _log_suffix())
        state.extend(units)
        lo, hi = self._lctx.seq_pos_range(seq_id)
        if units and (lo != 0 or hi + 1 != state.n_pos):
            self.reset(seq_id)
            raise SavedConversationError(
                f"the saved KV cells cover positions {lo}..{hi} but the saved units need 0..{state.n_pos - 1}")

    # ------------------------------------------------------------ prompts

    def tokenize(self, text: str, images: Sequence[ImageInput] = ()) -> Prompt:
        """Tokenize a rendered prompt; `text` holds `self.marker` once per image."""
        self._require_open()
        if images and not self.has_vision:
            raise VisionUnsupportedError(
                f"{self.model_path.name} was loaded without a projector (mmproj), so it cannot see images; "
                "pass mmproj=... or load the output directory"
            )
        if not self.has_vision:
            return tokenize_text(self._lmodel, text)
        pinned = {img.digest: e for img in images if (e := self._cached_embedding(img.digest)) is not None}
        with self.mtmd_lock:
            prompt = tokenize_multimodal(self._lproj, text, images, frozenset(pinned))
        short = {c.digest for c in prompt.chunks if c.kind == "image" and c.digest in pinned
                 and pinned[c.digest].size != c.n_tokens * self.n_embd_inp}
        if short:  # an entry that does not fill its grid would be read past its end: encode again
            log.warning("encoder cache: ignoring %d entry(ies) of the wrong length", len(short))
            prompt.close()
            for digest in short:
                del pinned[digest]
                self.encoder_cache.discard(digest)
                self._disk_hits.discard(digest)
                if self.disk_cache is not None:
                    self.disk_cache.discard(digest)
            with self.mtmd_lock:
                prompt = tokenize_multimodal(self._lproj, text, images, frozenset(pinned))
        prompt.embeddings = pinned  # held here, so eviction mid-call cannot lose them
        return prompt

    def _cached_embedding(self, digest: str) -> np.ndarray | None:
        """Encoder output from memory, else from disk (then kept in memory too)."""
        embd = self.encoder_cache.get(digest)
        if embd is None and self.disk_cache is not None and digest:
            embd = self.disk_cache.get(digest)
            if embd is not None:
                embd = embd.reshape(-1)
                self._disk_hits.add(digest)
                self.encoder_cache.put(digest, embd)
        return embd

    def take_disk_hit(self, digest: str) -> bool:
        """Whether `digest`'s embeddings were last read from the disk cache (each read counted once)."""
        if digest in self._disk_hits:
            self._disk_hits.discard(digest)
            return True
        return False

    def encode_image(self, image: ImageInput) -> tuple[np.ndarray, int, int]:
        """Encoder output of one image: (n_tokens x n_embd_inp float32 array, grid_x, grid_y).

        Served from the caches when they hold it; what they store, and what the
        parity tests compare with transformers.
        """
        self._require_open()
        if not self.has_vision:
            raise VisionUnsupportedError(f"{self.model_path.name} was loaded without a projector (mmproj)")
        with self.tokenize(self.marker, [image]) as prompt:
            chunk = next(c for c in prompt.chunks if c.kind == "image")
            nx, ny = image_grid(chunk.handle)
            embd = prompt.embeddings.get(chunk.digest or "")
            if embd is None:
                embd, _ = self.encode_chunk(chunk, keep=True)
        return np.array(embd, dtype=np.float32).reshape(chunk.n_tokens, self.n_embd_inp), nx, ny

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Refuse a prompt that cannot finish in the context before anything is evaluated."""
        if prompt_tokens + max_tokens > self.n_ctx_seq:
            raise ContextOverflowError(
                f"the prompt needs {prompt_tokens} tokens and max_tokens={max_tokens} more: "
                f"{prompt_tokens + max_tokens} > n_ctx={self.n_ctx_seq}. Raise n_ctx (e.g. "
                f"n_ctx={_round_up(prompt_tokens + max_tokens, 1024)}), lower max_tokens, "
                "use fewer/smaller images (image_max_tokens), fewer video tokens (VideoOptions "
                "max_tokens / fps / max_frames) or reset the conversation"
            )

    # ------------------------------------------------------------ evaluation

    def prefill(self, prompt: Prompt, seq_id: int = 0, reserve: int = 0) -> GenerationStats:
        """Bring the KV cache of `seq_id` to `prompt`, evaluating only the new suffix; the answer's
        stats with the prompt's part filled in.

        `reserve` is the number of tokens generation will need after the prompt.
        On error the sequence keeps what it held before the call minus at most
        the diverging suffix; its bookkeeping always matches the KV cache.
        """
        self._require_open()
        if not prompt.chunks:
            raise DecodeError("empty prompt")
        if prompt.chunks[-1].kind != "text":
            raise DecodeError("a prompt must end with text (the generation prompt)")
        self.check_fits(prompt.n_tokens, reserve)
        state = self._seq(seq_id)
        keep = plan_reuse(state, prompt.units)
        result = GenerationStats(
            prompt_tokens=prompt.n_tokens,
            image_tokens=prompt.n_image_tokens,
            images=prompt.n_images,
            reused_tokens=sum(u.n_tokens for u in prompt.units[:keep]),
        )
        if keep < len(state):
            self._truncate(seq_id, state, keep)
        cursor = PromptCursor(prompt, seq_id, keep)
        t0 = time.perf_counter()
        try:
            while not cursor.done:
                chunk = cursor.current
                assert chunk is not None and self._lbatch is not None and self._lembd is not None
                if chunk.kind == "text":
                    piece = cursor.next_piece(self.n_batch)
                    assert piece is not None
                    n = len(piece.tokens)
                    self.eval_tokens(self._lbatch, [(seq_id, t, piece.final and j == n - 1)
                                                    for j, t in enumerate(piece.tokens)])
                    cursor.advance(piece)
                else:
                    if cursor.embedding(chunk) is None:
                        cursor.embeddings[chunk.digest or ""] = self._image_embedding(chunk, prompt, result)
                    elif cursor.offset == 0:  # the same image (a repeated frame pair) earlier in this prompt
                        result.encoder_cache_hits += 1
                    piece = cursor.next_piece(self.n_ubatch)  # one ubatch a slice, as mtmd's helper decodes it
                    assert piece is not None
                    n = piece.n
                    self.eval_image_piece(self._lembd, cursor, piece)
                result.evaluated_tokens += n
        except BaseException:
            self._truncate(seq_id, state, len(state))  # drop cells of a half-done batch
            raise
        result.prefill_s = time.perf_counter() - t0 - result.image_encode_s
        if self.has_vision and result.evaluated_tokens >= 32:
            self.measured("prefill", result.evaluated_tokens, result.prefill_s)
        return result

    def measured(self, kind: str, tokens: int, seconds: float) -> None:
        """Feed the device cost model with one encode ("encoder") or prompt evaluation ("prefill") of
        `tokens`; the first of each kind is stored for later processes and for `edge-convert --plan`."""
        flops = self.vision.encoder_flops(tokens) if kind == "encoder" else tokens * self.text_flops_per_token
        with self._cost_lock:  # the server's vision and scheduler threads both measure
            if self.cost.record(kind, flops, seconds):
                save_cost(self._cost_dir, self._cost_key, self.cost)

    def _truncate(self, seq_id: int, state: SeqState, keep: int) -> None:
        pos = state.truncate(keep)
        if not self._lctx.seq_rm(seq_id, pos, -1):
            # only partial removal can fail (recurrent memory): drop the whole sequence
            self._lctx.seq_rm(seq_id, -1, -1)
            state.clear()

    def eval_tokens(self, batch: Batch, entries: Sequence[tuple[int, int, bool]]) -> None:
        """Evaluate (seq_id, token, logits) entries of one or many sequences in one llama_decode, each token
        at the next position of its sequence, and record them in the bookkeeping; the logits of entry i
        (when asked for) are batch output i. On failure every touched sequence drops its half-written cells."""
        self._require_open()
        next_pos: dict[int, int] = {}
        rows = []
        for seq_id, token, logits in entries:
            pos = next_pos.get(seq_id)
            if pos is None:
                pos = self._seq(seq_id).n_pos
            rows.append((seq_id, token, pos, logits))
            next_pos[seq_id] = pos + 1
        batch.put(rows)  # text tokens carry one position: llama.cpp spreads it over the M-RoPE sections
        try:
            self.decode(batch)
        except BaseException:
            for seq_id in next_pos:
                self.truncate(seq_id, len(self._seq(seq_id)))
            raise
        for seq_id, token, _ in entries:
            self._seq(seq_id).append(text_units((token,))[0])

    def eval_image_slice(self, batch: EmbeddingBatch, seq_id: int, chunk: Chunk, embd: np.ndarray,
                         positions: np.ndarray, start: int, n: int) -> None:
        """Evaluate image tokens [start, start+n) of `chunk` for `seq_id` (`embd`: n_tokens x n_embd rows,
        `positions`: the chunk's decoder positions from edge_llama.image_positions). The image joins the
        sequence's bookkeeping once its last slice is in; a failed slice drops the half-written cells."""
        self._require_open()
        batch.set(embd[start:start + n], positions[:, start:start + n], seq_id)
        state = self._seq(seq_id)
        try:
            self.decode(batch)
        except BaseException:
            self.truncate(seq_id, len(state))
            raise
        if start + n == chunk.n_tokens:
            state.append(image_unit(chunk.digest or "", chunk.n_tokens, chunk.n_pos))

    def guarded(self) -> Any:
        """Bounds a wait on RPC workers (a no-op without them): wrap llama_decode and sampling.

        llama_decode may return before the workers finish; reading the logits
        (sampling) is where the host then waits, so both are guarded.
        """
        return self._watchdog if self._watchdog is not None else contextlib.nullcontext()

    def decode(self, batch: Any) -> None:
        """Evaluate a token or embedding batch (edge_llama's Batch / EmbeddingBatch), the RPC wait bounded."""
        try:
            with self.guarded():
                self._lctx.decode_batch(batch)
        except LlamaError as exc:
            raise DecodeError(str(exc)) from exc

    def sample(self, sampler: Sampler, index: int = -1, bias: dict[int, float] | None = None) -> int:
        """Sample from batch output `index` (after adding `bias` to its logits); reading logits waits for RPC workers."""
        with self.guarded():
            if bias:
                logits = self._lctx.logits_view(index)
                for token, value in bias.items():
                    logits[token] += value
            return sampler.sample(self._lctx, index)

    def encode_chunk(self, chunk: Chunk, keep: bool = False,
                     stop: Callable[[], bool] | None = None) -> tuple[np.ndarray | None, float]:
        """Run the vision encoder on an image chunk: (flat embeddings, seconds), the one encode path.

        Feeds the memory and disk caches and the cost model. `keep`: return a copy even when no
        cache keeps one (else mtmd's buffer, valid until the next encode under `mtmd_lock`).
        `stop`: checked while the graph runs; (None, seconds) when it stopped the encode
        (a half-computed output is neither used nor cached).
        """
        with self.mtmd_lock:  # also guards mtmd's output buffer until it is used
            return self._encode_locked(chunk, keep, stop)

    def _encode_locked(self, chunk: Chunk, keep: bool,
                       stop: Callable[[], bool] | None = None) -> tuple[np.ndarray | None, float]:
        digest = chunk.digest or ""
        t0 = time.perf_counter()
        try:
            out = self._lproj.encode(chunk.handle, stop=stop, copy=False)
        except LlamaError as exc:
            raise DecodeError(str(exc)) from exc
        seconds = time.perf_counter() - t0
        if out is None:
            return None, seconds
        embd = out.reshape(-1)
        self.measured("encoder", chunk.n_tokens, seconds)
        if keep or (digest and (embd.nbytes <= self.encoder_cache.max_bytes or self.disk_cache is not None)):
            embd = embd.copy()
        if digest and embd.nbytes <= self.encoder_cache.max_bytes:
            self.encoder_cache.put(digest, embd)
        if digest and self.disk_cache is not None:
            self.disk_cache.put(digest, embd)
        return embd, seconds

    def known_embedding(self, chunk: Chunk, prompt: Prompt) -> np.ndarray | None:
        """An image chunk's encoder output without encoding (n_tokens x n_embd): pinned when the prompt was
        tokenized, else from the memory cache; None: the encoder must run."""
        digest = chunk.digest or ""
        embd = prompt.embeddings.get(digest)
        if embd is None and digest:
            embd = self.encoder_cache.get(digest)
        if embd is None and chunk.placeholder:
            raise DecodeError(f"image {digest[:12]} has neither pixels nor cached embeddings")
        return None if embd is None else np.asarray(embd).reshape(chunk.n_tokens, -1)

    def _image_embedding(self, chunk: Chunk, prompt: Prompt, stats: GenerationStats) -> np.ndarray:
        """An image chunk's encoder output from a cache or the encoder, counted in `stats`."""
        embd = self.known_embedding(chunk, prompt)
        if embd is not None:
            stats.encoder_cache_hits += 1
            stats.disk_cache_hits += self.take_disk_hit(chunk.digest or "")
            return embd
        encoded, seconds = self.encode_chunk(chunk, keep=True)
        assert encoded is not None
        stats.image_encode_s += seconds
        stats.images_encoded += 1
        return encoded.reshape(chunk.n_tokens, -1)

    def eval_image_piece(self, batch: EmbeddingBatch, cursor: PromptCursor, piece: Piece) -> None:
        """Evaluate a slice of the image `cursor` stands at (its embeddings are in the cursor), then move on."""
        chunk = cursor.current
        embd = cursor.embedding(chunk) if chunk is not None else None
        if chunk is None or embd is None:
            raise DecodeError("no image embeddings to evaluate")
        if cursor.positions is None:
            cursor.positions = image_positions(chunk.handle, self._seq(cursor.seq_id).n_pos, self.uses_mrope)
        self.eval_image_slice(batch, cursor.seq_id, chunk, embd, cursor.positions, piece.start, piece.n)
        cursor.advance(piece)

    # ------------------------------------------------------------ lifetime

    def _require_open(self) -> None:
        if self._model is None:
            raise EngineClosedError("the engine is closed")

    def close(self) -> None:
        """Free projector, batch, context and model (in that order), then release the RPC workers; idempotent."""
        if self._watchdog is not None:
            self._watchdog.close()
            self._watchdog = None
        for name in ("_lproj", "_lembd", "_lbatch", "_lctx", "_lmodel"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()
            setattr(self, name, None)
        self._model = None
        if self.placement is not None:
            unguard_workers(self.placement.endpoints)
            self.placement = None


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


_log_suffix = log_suffix
