"""The engine: a text GGUF + projector on llama.cpp's low-level API, with KV reuse.

One `Engine` owns a llama model, one llama context (its KV cache holds up to
`n_seq_max` sequences) and, for vision models, an mtmd context. For each
sequence it remembers which units (text tokens, images by content hash) are in
the KV cache, so `prefill` evaluates only what follows the longest common
prefix. Encoder outputs are kept in a byte-bounded LRU cache so another
conversation about the same image skips the vision encoder.

The engine is not thread-safe; callers serialise access (VisionChat holds a lock).
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd

from edge_common.preflight import projector_problems
from edge_llama import (Batch, Closeable, Context, ContextOptions, LlamaLoadError, LoadOptions, Model, Projector,
                        ProjectorOptions, log_suffix, model_meta)
from edge_llama.graph_watch import GraphWatch
from edge_llama.params import resolve_mmap, resolve_ubatch
from edge_llama.placement import Placement, place
from edge_llama.rpc import DecodeWatchdog, placement_from_log, unguard_workers
from edge_models import chat_format

from .backend import (
    ensure_backend,
    kv_type,
    physical_cores,
    projector_free_bytes,
    projector_on_gpu,
    resolve_flash_attn,
    resolve_gpu_layers,
    take_errors,
)
from .disk_cache import DiskEncoderCache, projector_sha256
from .encoder_cache import EncoderCache
from .image_budget import (HIGH_MAX_TOKENS, DeviceCost, ImagePlan, Planner, cost_key, device_key, load_cost,
                           idle_expert_params, save_cost, text_flops_per_token)
from .errors import (
    ContextOverflowError,
    DecodeError,
    EngineClosedError,
    ModelFileError,
    ModelLoadError,
    ProjectorMismatchError,
    SavedConversationError,
    VisionUnsupportedError,
)
from .kv_state import SeqState, Unit, image_unit, plan_reuse, text_units
from .llama_state import load_seq_state, seq_pos_range, seq_state_bytes
from .options import EngineOptions
from .prompt import Chunk, ImageInput, Prompt, token_ids, tokenize_multimodal, tokenize_text
from .sampling import Sampler
from .saved_conversation import StateFingerprint, file_sha256
from .vision_spec import read_vision_spec

log = logging.getLogger("edge_runtime")


@dataclass
class PrefillResult:
    prompt_tokens: int = 0
    image_tokens: int = 0
    images: int = 0
    reused_tokens: int = 0
    evaluated_tokens: int = 0
    images_encoded: int = 0
    encoder_cache_hits: int = 0
    image_encode_s: float = 0.0
    prefill_s: float = 0.0
    disk_cache_hits: int = 0


@dataclass
class DecodeOutcome:
    """Filled in by `Engine.decode_tokens` as it runs."""

    generated: int = 0
    stop_reason: str = ""


def _check_file(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"{what} not found: {p}")
    return p


class Engine(Closeable):
    def __init__(
        self, model_path: str | Path, mmproj_path: str | Path | None = None, options: EngineOptions | None = None
    ) -> None:
        self.options = options or EngineOptions()
        self.model_path = _check_file(model_path, "text model GGUF")
        self.mmproj_path = _check_file(mmproj_path, "projector GGUF") if mmproj_path else None
        ensure_backend()
        self._model = self._ctx = self._mctx = None
        # The mtmd context is not thread-safe: tokenizing and encoding take this lock, so a
        # caller on another thread (the server's vision thread vs. a conversation save on the
        # scheduler thread) waits instead of racing. Re-entrant: prefill encodes under it.
        self.mtmd_lock = threading.RLock()
        # the image encoder's graph: timed inside encoder_watch.timing(), stoppable inside .stopping()
        self.encoder_watch = GraphWatch()
        self._cost_lock = threading.Lock()
        self.placement: Placement | None = None
        self._watchdog: DecodeWatchdog | None = None
        self._lmodel: Model | None = None
        self._lctx: Context | None = None
        self._lproj: Projector | None = None
        self._lbatch: Batch | None = None
        self._batch: Any = None
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
        self._vocab = self._lmodel.vocab
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
        self._ctx = self._lctx.ptr
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self.marker = mtmd.mtmd_default_marker().decode("utf-8")
        self.n_ctx = int(llama_cpp.llama_n_ctx(self._ctx))
        self.n_ctx_seq = int(llama_cpp.llama_n_ctx_seq(self._ctx))
        self.n_batch = int(llama_cpp.llama_n_batch(self._ctx))
        self.n_ubatch = int(llama_cpp.llama_n_ubatch(self._ctx))
        self._lbatch = Batch(self.n_batch)
        self._batch = self._lbatch.raw
        self.n_embd_inp = int(llama_cpp.llama_model_n_embd_inp(self._model))
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
        if self.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO and not use_gpu:
            # mtmd resolves "auto" only in its warm-up, which the CPU skips: without this the
            # projector would run without flash attention (slower, and O(patches^2) memory).
            flash = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
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
            eval_callback=self.encoder_watch.callback)
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
        self._mctx = self._lproj.ptr
        if not mtmd.mtmd_support_vision(self._mctx):
            raise ModelLoadError(f"{self.mmproj_path.name} has no vision encoder")

    def _init_image_costs(self) -> None:
        opts = self.options
        self._cost_dir = Path(opts.cost_cache_dir).expanduser() if opts.cost_cache_dir else None
        self._cost_key = cost_key(self.model_path, self.mmproj_path,
                                  device_key(self.threads, self.projector_gpu, self.n_gpu_layers))
        self.cost: DeviceCost = load_cost(self._cost_dir, self._cost_key, self.projector_gpu, self.vision.signature)
        self.text_flops_per_token = text_flops_per_token(int(llama_cpp.llama_model_n_params(self._model))
                                                         - idle_expert_params(self.meta, self.arch),
                                                         int(llama_cpp.llama_vocab_n_tokens(self._vocab)),
                                                         int(llama_cpp.llama_model_n_embd(self._model)))
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
        n_layer = int(llama_cpp.llama_model_n_layer(self._model))
        n_head = int(llama_cpp.llama_model_n_head(self._model))
        n_head_kv = int(llama_cpp.llama_model_n_head_kv(self._model))
        n_embd = int(llama_cpp.llama_model_n_embd(self._model))
        head_k = int(self.meta(f"{self.arch}.attention.key_length") or n_embd // max(n_head, 1))
        head_v = int(self.meta(f"{self.arch}.attention.value_length") or head_k)
        return n_layer * (type_k.row_bytes(n_head_kv * head_k) + type_v.row_bytes(n_head_kv * head_v))

    def _end_of_turn_tokens(self) -> frozenset[int]:
        """EOG tokens plus the template's end-of-turn token if the vocab forgot to flag it."""
        extra = set()
        for text in chat_format(self.arch).end_of_turn:
            ids = token_ids(self._vocab, text, add_special=False)
            if len(ids) == 1:
                extra.add(ids[0])
        return frozenset(extra)

    # ------------------------------------------------------------ metadata

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value of the text model as a string (None if absent)."""
        self._require_open()
        return model_meta(self._model, key)

    @property
    def chat_template(self) -> str | None:
        raw = llama_cpp.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8") if raw else None

    def special_token_text(self, which: str) -> str | None:
        """Text of the "bos" or "eos" token, for chat templates that mention them."""
        fn = {"bos": llama_cpp.llama_vocab_bos, "eos": llama_cpp.llama_vocab_eos}[which]
        token = fn(self._vocab)
        if token < 0:
            return None
        text = llama_cpp.llama_vocab_get_text(self._vocab, token)
        return text.decode("utf-8", errors="replace") if text else None

    @property
    def has_vision(self) -> bool:
        return self._mctx is not None

    @property
    def model(self) -> Any:
        return self._model

    @property
    def ctx(self) -> Any:
        return self._ctx

    @property
    def vocab(self) -> Any:
        return self._vocab

    @property
    def mtmd_ctx(self) -> Any:
        """The projector's mtmd context (None without one); not thread-safe: one user at a time."""
        return self._mctx

    @property
    def uses_mrope(self) -> bool:
        """Image tokens take M-RoPE positions (t, y, x, z) rather than one running position."""
        return bool(self._mctx) and bool(mtmd.mtmd_decode_use_mrope(self._mctx))

    def truncate(self, seq_id: int, keep: int) -> None:
        """Keep the first `keep` units of sequence `seq_id` (cells past them, even half-written, go)."""
        self._truncate(seq_id, self._seq(seq_id), keep)

    @staticmethod
    def take_log_errors() -> list[str]:
        return take_errors()

    @staticmethod
    def log_suffix() -> str:
        """': <recent llama.cpp errors>' for an exception message, or ''."""
        return _log_suffix()

    def is_end_of_turn(self, token: int) -> bool:
        return token in self._eot or bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    # ------------------------------------------------------------ KV accounting

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes allocated for K and V (n_ctx cells)."""
        return self._kv_token_bytes * self.n_ctx

    def kv_used_bytes(self, seq_id: int | None = None) -> int:
        seqs = self._seqs.values() if seq_id is None else [self._seq(seq_id)]
        return self._kv_token_bytes * sum(s.n_tokens for s in seqs)

    def seq_state(self, seq_id: int = 0) -> SeqState:
        return self._seq(seq_id)

    def _seq(self, seq_id: int) -> SeqState:
        if not 0 <= seq_id < self.options.n_seq_max:
            raise ValueError(f"seq_id {seq_id} outside [0, n_seq_max={self.options.n_seq_max})")
        return self._seqs.setdefault(seq_id, SeqState())

    def reset(self, seq_id: int = 0) -> None:
        """Forget sequence `seq_id` (its KV cells are freed)."""
        self._require_open()
        llama_cpp.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
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
        return list(self._seq(seq_id).units), seq_state_bytes(self._ctx, seq_id)

    def import_seq(self, seq_id: int, units: Sequence[Unit], data: bytearray) -> None:
        """Put exported cells into `seq_id` and take `units` as its bookkeeping, so the
        next prefill reuses them. On refusal the sequence is left empty."""
        self._require_open()
        self.check_fits(sum(u.n_tokens for u in units), 0)
        state = self._seq(seq_id)
        state.clear()
        if not load_seq_state(self._ctx, seq_id, data):
            llama_cpp.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
            raise SavedConversationError(
                "llama.cpp refused the saved KV cells (another layer count, KV type, or flash-attention "
                "setting, which changes the V layout)" + _log_suffix())
        state.extend(units)
        lo, hi = seq_pos_range(self._ctx, seq_id)
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
            return tokenize_text(self._vocab, text)
        pinned = {img.digest: e for img in images if (e := self._cached_embedding(img.digest)) is not None}
        with self.mtmd_lock:
            prompt = tokenize_multimodal(self._mctx, text, images, frozenset(pinned))
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
            nx = int(mtmd.mtmd_image_tokens_get_nx(mtmd.mtmd_input_chunk_get_tokens_image(chunk.handle)))
            ny = int(mtmd.mtmd_image_tokens_get_ny(mtmd.mtmd_input_chunk_get_tokens_image(chunk.handle)))
            embd = prompt.embeddings.get(chunk.digest or "")
            if embd is None:
                embd, _ = self._encode(chunk, keep=True)
        return np.array(embd, dtype=np.float32).reshape(chunk.n_tokens, self.n_embd_inp), nx, ny

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.n_ctx_seq:
            raise ContextOverflowError(
                f"the prompt needs {prompt_tokens} tokens and max_tokens={max_tokens} more: "
                f"{prompt_tokens + max_tokens} > n_ctx={self.n_ctx_seq}. Raise n_ctx (e.g. "
                f"n_ctx={_round_up(prompt_tokens + max_tokens, 1024)}), lower max_tokens, "
                "use fewer/smaller images (image_max_tokens), fewer video tokens (VideoOptions "
                "max_tokens / fps / max_frames) or reset the conversation"
            )

    # ------------------------------------------------------------ evaluation

    def prefill(self, prompt: Prompt, seq_id: int = 0, reserve: int = 0) -> PrefillResult:
        """Bring the KV cache of `seq_id` to `prompt`, evaluating only the new suffix.

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
        result = PrefillResult(
            prompt_tokens=prompt.n_tokens,
            image_tokens=prompt.n_image_tokens,
            images=prompt.n_images,
            reused_tokens=sum(u.n_tokens for u in prompt.units[:keep]),
        )
        if keep < len(state):
            self._truncate(seq_id, state, keep)
        t0 = time.perf_counter()
        try:
            unit = 0
            last = len(prompt.chunks) - 1
            for i, chunk in enumerate(prompt.chunks):
                n_units = len(chunk.tokens) if chunk.kind == "text" else 1
                start, unit = unit, unit + n_units
                if unit <= keep:
                    continue
                if chunk.kind == "text":
                    tokens = chunk.tokens[max(0, keep - start) :]
                    self._decode_text(tokens, seq_id, state, logits_last=i == last)
                    result.evaluated_tokens += len(tokens)
                else:
                    self._decode_image(chunk, prompt, seq_id, state, result)
                    result.evaluated_tokens += chunk.n_tokens
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
        if not llama_cpp.llama_memory_seq_rm(self._mem, seq_id, pos, -1):
            # only partial removal can fail (recurrent memory): drop the whole sequence
            llama_cpp.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
            state.clear()

    def _decode_text(self, tokens: Sequence[int], seq_id: int, state: SeqState, logits_last: bool) -> None:
        batch = self._batch
        for begin in range(0, len(tokens), self.n_batch):
            part = tokens[begin : begin + self.n_batch]
            n = len(part)
            final = logits_last and begin + n == len(tokens)
            for j, token in enumerate(part):
                batch.token[j] = token
                batch.pos[j] = state.n_pos + j
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = seq_id
                batch.logits[j] = 0
            if final:
                batch.logits[n - 1] = 1
            batch.n_tokens = n
            self._decode_batch(n)
            state.extend(text_units(part))

    def guarded(self) -> Any:
        """Bounds a wait on RPC workers (a no-op without them): wrap llama_decode and sampling.

        llama_decode may return before the workers finish; reading the logits
        (sampling) is where the host then waits, so both are guarded.
        """
        return self._watchdog if self._watchdog is not None else contextlib.nullcontext()

    def _decode_batch(self, n: int) -> None:
        with self.guarded():
            rc = llama_cpp.llama_decode(self._ctx, self._batch)
        if rc != 0:
            reason = {1: "no free KV-cache slot (raise n_ctx)", 2: "aborted", -1: "invalid batch"}.get(rc, "fatal error")
            raise DecodeError(f"llama_decode failed on {n} token(s): {reason} (code {rc})" + _log_suffix())

    def _encode(self, chunk: Chunk, keep: bool = False) -> tuple[np.ndarray, float]:
        """Run the vision encoder on an image chunk: (embeddings, seconds); feeds the caches and the cost model."""
        with self.mtmd_lock:  # also guards mtmd's output buffer until it is used
            return self._encode_locked(chunk, keep)

    def _encode_locked(self, chunk: Chunk, keep: bool) -> tuple[np.ndarray, float]:
        digest = chunk.digest or ""
        t0 = time.perf_counter()
        take_errors()
        if mtmd.mtmd_encode_chunk(self._mctx, chunk.handle) != 0:
            raise DecodeError("the vision encoder failed on an image" + _log_suffix())
        out = mtmd.mtmd_get_output_embd(self._mctx)
        n = chunk.n_tokens * self.n_embd_inp
        # mtmd's own buffer, valid until the next encode: copied only when a cache keeps it
        embd = np.ctypeslib.as_array(out, shape=(n,))
        seconds = time.perf_counter() - t0
        self.measured("encoder", chunk.n_tokens, seconds)
        if keep or (digest and (embd.nbytes <= self.encoder_cache.max_bytes or self.disk_cache is not None)):
            embd = embd.copy()
        if digest and embd.nbytes <= self.encoder_cache.max_bytes:
            self.encoder_cache.put(digest, embd)
        if digest and self.disk_cache is not None:
            self.disk_cache.put(digest, embd)
        return embd, seconds

    def _decode_image(self, chunk: Chunk, prompt: Prompt, seq_id: int, state: SeqState, result: PrefillResult) -> None:
        with self.mtmd_lock:  # an uncopied encoder output lives in mtmd's buffer until decoded
            self._decode_image_locked(chunk, prompt, seq_id, state, result)

    def _decode_image_locked(self, chunk: Chunk, prompt: Prompt, seq_id: int, state: SeqState,
                             result: PrefillResult) -> None:
        digest = chunk.digest or ""
        embd = prompt.embeddings.get(digest)
        if embd is None and not chunk.placeholder:
            embd = self.encoder_cache.get(digest) if digest else None
        if embd is None:
            if chunk.placeholder:
                raise DecodeError(f"image {digest[:12]} has neither pixels nor cached embeddings")
            embd, seconds = self._encode(chunk)
            result.image_encode_s += seconds
            result.images_encoded += 1
        else:
            result.encoder_cache_hits += 1
            if digest in self._disk_hits:
                self._disk_hits.discard(digest)
                result.disk_cache_hits += 1
        new_n_past = llama_cpp.llama_pos(0)
        with self.guarded():
            rc = self._decode_image_embd(chunk, embd, state, seq_id, new_n_past)
        if rc != 0:
            raise DecodeError(f"decoding image embeddings failed (code {rc})" + _log_suffix())
        state.append(image_unit(digest, chunk.n_tokens, chunk.n_pos))
        if new_n_past.value != state.n_pos:  # M-RoPE bookkeeping must agree with mtmd
            raise DecodeError(f"position mismatch after image: mtmd {new_n_past.value}, engine {state.n_pos}")

    def _decode_image_embd(self, chunk: Chunk, embd: Any, state: SeqState, seq_id: int, new_n_past: Any) -> int:
        return mtmd.mtmd_helper_decode_image_chunk(
            self._mctx,
            self._ctx,
            chunk.handle,
            embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
            state.n_pos,
            seq_id,
            self.n_ubatch,  # the helper's batch holds n x n_embd_inp floats: one ubatch is enough
            ctypes.byref(new_n_past),
            mtmd.mtmd_helper_post_decode_callback(),
            None,
        )

    # ------------------------------------------------------------ generation

    def decode_tokens(
        self, sampler: Sampler, seq_id: int = 0, max_tokens: int | None = None, outcome: DecodeOutcome | None = None
    ) -> Iterator[int]:
        """Sample tokens after a `prefill`; yields each token before evaluating it.

        Closing the generator early (a stop string) leaves the KV cache holding
        exactly the tokens already evaluated. End-of-turn tokens are not yielded.
        """
        self._require_open()
        state = self._seq(seq_id)
        outcome = outcome if outcome is not None else DecodeOutcome()
        limit = self.n_ctx_seq - state.n_tokens
        if max_tokens is not None:
            limit = min(limit, max_tokens)
        batch = self._batch
        while True:
            with self.guarded():
                token = sampler.sample(self._ctx, -1)
            if self.is_end_of_turn(token):
                outcome.stop_reason = "eog"
                return
            outcome.generated += 1
            outcome.stop_reason = "cancelled"
            yield token
            if outcome.generated >= limit:
                outcome.stop_reason = "length"
                return
            batch.token[0] = token
            batch.pos[0] = state.n_pos
            batch.n_seq_id[0] = 1
            batch.seq_id[0][0] = seq_id
            batch.logits[0] = 1
            batch.n_tokens = 1
            try:
                self._decode_batch(1)
            except BaseException:
                self._truncate(seq_id, state, len(state))
                raise
            state.append(text_units((token,))[0])

    # ------------------------------------------------------------ lifetime

    def _require_open(self) -> None:
        if self._model is None:
            raise EngineClosedError("the engine is closed")

    def close(self) -> None:
        """Free projector, batch, context and model (in that order), then release the RPC workers; idempotent."""
        if self._watchdog is not None:
            self._watchdog.close()
            self._watchdog = None
        for name in ("_lproj", "_lbatch", "_lctx", "_lmodel"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()
            setattr(self, name, None)
        self._mctx = self._batch = self._ctx = self._model = None
        if self.placement is not None:
            unguard_workers(self.placement.endpoints)
            self.placement = None


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


_log_suffix = log_suffix
