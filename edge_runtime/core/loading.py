"""A text GGUF, its llama context and its projector loaded through edge_llama, placed on RPC workers.

`LoadedModel` resolves the options against this device (flash attention, GPU layers, mmap,
ubatch), places the layers on RPC workers when asked, and owns the llama.cpp objects and
their order of release. It knows nothing of sequences, caches or prompts: the `Engine`
builds those on it.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Any

from edge_common.preflight import projector_problems
from edge_llama import (FLASH_ATTN_AUTO, FLASH_ATTN_OFF, FLASH_ATTN_ON, Batch, Closeable, Context, ContextOptions, EmbeddingBatch,
                        LlamaLoadError, LoadOptions, Model, Projector, ProjectorOptions, default_marker,
                        ensure_backend, kv_type, log_suffix, physical_cores, take_errors)
from edge_llama.experts import ALL_EXPERTS_ON_HOST, TensorOverride, experts_on_host, fit_n_cpu_moe, layer_bytes, \
    parse_overrides
from edge_llama.ggml_devices import DEVICE_GPU, DEVICE_IGPU, local_devices
from edge_llama.graph_watch import GraphWatch
from edge_llama.offload import projector_on_gpu, resolve_flash_attn, resolve_gpu_layers
from edge_llama.params import resolve_mmap, resolve_ubatch
from edge_llama.placement import Placement, place
from edge_llama.rpc import DecodeWatchdog, SplitPlan, assign_layers, placement_from_log, unguard_workers
from edge_models import chat_format

from edge_runtime.core.options import EngineOptions
from edge_runtime.core.tuned import apply_tuned
from edge_runtime.errors import (EngineClosedError, ModelFileError, ModelLoadError, ProjectorMismatchError,
                                 VisionUnsupportedError)
from edge_runtime.vision.image_budget import HIGH_MAX_TOKENS
from edge_runtime.vision.vision_spec import read_vision_spec

log = logging.getLogger("edge_runtime")

# Room left on an offload device beside its weights and KV cache when experts are placed
# automatically: llama.cpp's compute buffers, which grow with n_ubatch.
COMPUTE_RESERVE = 512 << 20


def _check_file(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"{what} not found: {p}")
    return p


class LoadedModel(Closeable):
    """The llama.cpp objects of one model pair and the settings they were resolved to; closed in order."""

    def __init__(
        self, model_path: str | Path, mmproj_path: str | Path | None = None, options: EngineOptions | None = None
    ) -> None:
        self.model_path = _check_file(model_path, "text model GGUF")
        self.mmproj_path = _check_file(mmproj_path, "projector GGUF") if mmproj_path else None
        # the settings left unset take this device's tuned values (edge-bench --tune), else the defaults
        self.options, self.tuned, self.tuned_file = apply_tuned(options or EngineOptions(), self.model_path,
                                                                self.mmproj_path)
        ensure_backend()
        self._model: Any = None  # the text model's pointer: None once closed
        # The mtmd context is not thread-safe: tokenizing and encoding take this lock, so a
        # caller on another thread (the server's vision thread vs. a conversation save on the
        # scheduler thread) waits instead of racing. Re-entrant: prefill encodes under it.
        self.mtmd_lock = threading.RLock()
        # the image encoder's graph: timed inside encoder_watch.timing(), stoppable inside .stopping()
        self.encoder_watch: GraphWatch | None = None
        self.placement: Placement | None = None
        self.n_cpu_moe = 0  # leading blocks whose experts stay in host RAM (--n-cpu-moe)
        self.experts_how = ""  # where the experts went and why, for the load log
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
        overrides = parse_overrides(opts.override_tensor) + self._experts_on_host(type_k, type_v)
        load = LoadOptions(self.n_gpu_layers, mmap=self.mmap, repack=opts.repack, amx=opts.amx,
                           placement=self.placement, overrides=overrides)
        try:
            self._lmodel = Model(self.model_path, load)
        except LlamaLoadError as exc:
            raise ModelLoadError(str(exc)) from exc
        self.weights_how = f"{self._lmodel.how}; {self.experts_how}"
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
        self.kv_token_bytes = self._kv_bytes_per_token(type_k, type_v)

        if self.mmproj_path is not None:
            self._load_projector()
        self._eot = self._end_of_turn_tokens()
        log.info(
            "loaded %s (%s)%s: n_ctx=%d, KV %s/%s, flash_attn=%s, gpu_layers=%d, threads=%d, "
            "n_batch=%d/%d, weights %s%s",
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
            self.tuned_note(),
        )

    def tuned_note(self) -> str:
        """Which settings came from edge-bench --tune's file (for the load log and engine info)."""
        if not self.tuned:
            return ""
        return (" (tuned: " + ", ".join(f"{k}={v}" for k, v in sorted(self.tuned.items()))
                + f" from {self.tuned_file})")

    def _experts_on_host(self, type_k: Any, type_v: Any) -> tuple[TensorOverride, ...]:
        """--n-cpu-moe as asked, or ("auto") the fewest blocks whose experts must stay in host RAM for
        the offloaded part to fit the devices' free memory; sets `n_cpu_moe` and `experts_how`."""
        opts = self.options
        self.n_cpu_moe = 0
        devices = self._offload_devices() if opts.n_cpu_moe == "auto" and not opts.override_tensor else None
        if devices == []:  # nothing to choose, so the tensor table is not read (it costs a GGUF parse)
            self.experts_how = "experts, if any, in host RAM with everything else (no GPU or RPC device to offload to)"
            return ()
        sizes = layer_bytes(self.model_path)
        if not sizes.has_experts:
            self.experts_how = "no experts (dense model)"
            return ()
        if opts.n_cpu_moe == "all":
            self.n_cpu_moe = sizes.n_layer
            self.experts_how = "all experts in host RAM (asked)"
            return (ALL_EXPERTS_ON_HOST,)
        if opts.n_cpu_moe != "auto":
            self.n_cpu_moe = min(opts.n_cpu_moe, sizes.n_layer)
            self.experts_how = f"experts of blocks 0-{self.n_cpu_moe - 1} in host RAM (asked)" if self.n_cpu_moe \
                else "experts beside their layers (asked)"
            return experts_on_host(self.n_cpu_moe)
        if opts.override_tensor:
            self.experts_how = "experts where --override-tensor puts them"
            return ()
        assert devices  # "auto" without an --override-tensor: the devices were listed above
        plan = self.placement.plan if self.placement is not None else SplitPlan(self.n_gpu_layers, (1.0,))
        owners = assign_layers(sizes.n_layer, plan, len(devices))
        # each device's KV cache (n_ctx cells of its blocks) and compute buffers beside its weights
        kv_block = self.options.n_ctx * (type_k.row_bytes(sizes.kv_widths[0]) + type_v.row_bytes(sizes.kv_widths[1]))
        reserve = [COMPUTE_RESERVE + kv_block * owners.count(d + 1) for d in range(len(devices))]
        n = fit_n_cpu_moe(sizes, owners, [free for _, free in devices], reserve)
        names = ", ".join(name for name, _ in devices)
        if n is None:
            n = sizes.n_layer
            log.warning("the layers offloaded to %s do not fit their free memory even with every expert in host "
                        "RAM: lower --n-gpu-layers or change --tensor-split", names)
        self.n_cpu_moe = n
        self.experts_how = (f"experts of blocks 0-{n - 1} in host RAM (auto: the rest fits {names})" if n
                            else f"experts beside their layers (auto: all fit {names})")
        return experts_on_host(n)

    def _offload_devices(self) -> list[tuple[str, int]]:
        """(name, free bytes) of each device layers are offloaded to, in llama.cpp's order; local GPUs
        pooled as one (llama.cpp splits among them by free memory)."""
        gpus = [d for d in local_devices() if d.kind in (DEVICE_GPU, DEVICE_IGPU)]
        if self.placement is not None:
            local = [] if self.placement.local_cpu else [(d.name, d.free) for d in self.placement.local]
            return local + [(f"{d.name} ({d.description})", d.free) for d in self.placement.workers]
        if self.n_gpu_layers == 0 or not gpus:
            return []
        return [("+".join(d.name for d in gpus), sum(d.free for d in gpus))]

    def _load_projector(self) -> None:
        problems = projector_problems(self.mmproj_path)
        if problems:
            raise ModelLoadError(f"projector {self.mmproj_path}: " + "; ".join(problems))
        opts = self.options
        use_gpu = projector_on_gpu(opts.mmproj_gpu, self.n_gpu_layers)
        if opts.mmproj_flash_attn != "auto":
            flash = FLASH_ATTN_ON if opts.mmproj_flash_attn else FLASH_ATTN_OFF
        elif self.flash_attn_type == FLASH_ATTN_AUTO and not use_gpu:
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
    def projector(self) -> Projector:
        """The mtmd context (tokenize and encode under `mtmd_lock`)."""
        self._require_open()
        if self._lproj is None:
            raise VisionUnsupportedError(f"{self.model_path.name} was loaded without a projector (mmproj)")
        return self._lproj

    @property
    def uses_mrope(self) -> bool:
        """Image tokens take M-RoPE positions (t, y, x, z) rather than one running position."""
        return self._lproj is not None and self._lproj.uses_mrope

    @staticmethod
    def take_log_errors() -> list[str]:
        """llama.cpp's recent error lines, consumed, so a failure can say what llama.cpp said."""
        return take_errors()

    @staticmethod
    def log_suffix() -> str:
        """': <recent llama.cpp errors>' for an exception message, or ''."""
        return log_suffix()

    def is_end_of_turn(self, token: int) -> bool:
        """Whether generation should stop here: any end-of-generation token, or the template's end of turn."""
        return token in self._eot or self._lmodel.is_eog(token)

    def guarded(self) -> Any:
        """Bounds a wait on RPC workers (a no-op without them): wrap llama_decode and sampling.

        llama_decode may return before the workers finish; reading the logits
        (sampling) is where the host then waits, so both are guarded.
        """
        return self._watchdog if self._watchdog is not None else contextlib.nullcontext()

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
