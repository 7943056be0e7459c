"""Each llama.cpp / mtmd C object wrapped once, with its cleanup (as llama-cpp-python's `_internals.py`).

Nothing above this layer calls a llama.cpp load or free function: the
runtime, the server's batch, quant's quality evaluation, the bench workers
and the tests build these objects. Pointers are owned here and freed on
close() (or when the object is collected); failures become LlamaLoadError /
LlamaError naming the file and carrying llama.cpp's error lines.
"""
from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import llama_cpp as L
from llama_cpp import mtmd_cpp as M

from .backend import capture, ensure_backend, log_suffix, take_errors
from .errors import LlamaError, LlamaLoadError
from .hardware import physical_cores
from .params import LoadOptions, build_model_params

log = logging.getLogger("edge_llama")

CHUNK_TEXT = getattr(M, "MTMD_INPUT_CHUNK_TYPE_TEXT", 0)


def model_meta(model_ptr: Any, key: str) -> str | None:
    """A GGUF metadata value as a string (None if absent); grows the buffer for long ones (chat templates)."""
    size = 4096
    while True:
        buf = ctypes.create_string_buffer(size)
        n = L.llama_model_meta_val_str(model_ptr, key.encode(), buf, size)
        if n < 0:
            return None
        if n < size:
            return buf.value.decode("utf-8", "replace")
        size = n + 1


class Closeable:
    """close() on `with` exit and when collected; close() must be idempotent."""

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class _Owned(Closeable):
    """Frees its pointer once."""

    ptr: Any = None

    def _free(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self._free()
            self.ptr = None


class Model(_Owned):
    """A text GGUF; `how` says how its weights were loaded (mmap/read, AMX/repack/plain)."""

    def __init__(self, path: str | Path, options: LoadOptions = LoadOptions(), *, plan: Any = None,
                 what: str = "text model"):
        ensure_backend()
        self.path = Path(path)
        if not self.path.is_file():
            raise LlamaLoadError(f"{what} not found: {self.path}")
        built = build_model_params(self.path, options, plan=plan)
        self.how = built.how
        take_errors()
        with capture() as cap:  # llama.cpp says where layers and weights went only in its log
            self.ptr = L.llama_model_load_from_file(str(self.path).encode(), built.params)
        self.load_log = cap.text.splitlines()
        if not self.ptr:
            errors = take_errors()
            raise LlamaLoadError(f"llama.cpp could not load the {what} {self.path}"
                                 + (": " + " | ".join(errors[-3:]) if errors else ""), errors)
        log.info("weights of %s: %s", self.path.name, self.how)
        self.vocab = L.llama_model_get_vocab(self.ptr)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_embd = L.llama_model_n_embd(self.ptr)
        self.n_embd_inp = L.llama_model_n_embd_inp(self.ptr)  # n_embd x (1 + deepstack layers)

    def _free(self) -> None:
        L.llama_model_free(self.ptr)

    def meta(self, key: str) -> str | None:
        return model_meta(self.ptr, key)

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (L.llama_token * cap)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]


@dataclass(frozen=True)
class ContextOptions:
    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    n_seq_max: int = 1
    n_threads: int | None = None
    type_k: int = L.GGML_TYPE_F16
    type_v: int = L.GGML_TYPE_F16
    flash_attn: int = L.LLAMA_FLASH_ATTN_TYPE_AUTO
    no_perf: bool = True
    eval_callback: Any = None  # a ggml scheduler eval callback (graph_watch.GraphWatch.callback)


class Batch(_Owned):
    """A llama_batch of up to `capacity` tokens on one sequence each; `raw` is the C struct."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.raw = L.llama_batch_init(capacity, 0, 1)
        self.ptr = True  # llama_batch is returned by value: ownership is tracked by a flag

    def _free(self) -> None:
        L.llama_batch_free(self.raw)

    def fill(self, tokens: Sequence[int], pos0: int, seq: int = 0, *, logits: str = "last") -> None:
        """tokens at positions pos0..; logits for "last", "all" or "none" of them."""
        if len(tokens) > self.capacity:
            raise LlamaError(f"{len(tokens)} tokens do not fit a batch of {self.capacity}")
        b = self.raw
        for i, tok in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits == "all"
        if logits == "last" and tokens:
            b.logits[len(tokens) - 1] = 1
        b.n_tokens = len(tokens)


_DECODE_REASONS = {1: "no free KV-cache slot (raise n_ctx)", 2: "aborted", -1: "invalid batch"}


class Context(_Owned):
    def __init__(self, model: Model, options: ContextOptions = ContextOptions()):
        self.model, self.options = model, options
        p = L.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = options.n_ctx, options.n_batch, options.n_ubatch, options.n_seq_max
        threads = options.n_threads or physical_cores()
        p.n_threads = p.n_threads_batch = threads
        p.type_k, p.type_v, p.flash_attn_type = int(options.type_k), int(options.type_v), options.flash_attn
        p.no_perf = options.no_perf
        if options.eval_callback is not None:
            p.cb_eval = options.eval_callback
        take_errors()
        self.ptr = L.llama_init_from_model(model.ptr, p)
        if not self.ptr:
            errors = take_errors()
            raise LlamaLoadError(f"{model.path}: llama.cpp could not create a context (n_ctx={options.n_ctx})"
                                 + (": " + " | ".join(errors[-3:]) if errors else "; try a smaller n_ctx"), errors)
        self.memory = L.llama_get_memory(self.ptr)
        self._batch: Batch | None = None

    def _free(self) -> None:
        if self._batch is not None:
            self._batch.close()
        L.llama_free(self.ptr)

    @property
    def n_ctx(self) -> int:
        return L.llama_n_ctx(self.ptr)

    def decode_batch(self, batch: Batch) -> None:
        rc = L.llama_decode(self.ptr, batch.raw)
        if rc != 0:
            reason = _DECODE_REASONS.get(rc, "fatal error")
            raise LlamaError(f"llama_decode failed on {batch.raw.n_tokens} token(s): {reason} (code {rc})"
                             + log_suffix())

    def decode(self, tokens: Sequence[int], pos0: int = 0, seq: int = 0, *, all_logits: bool = False) -> None:
        """Decode tokens at positions pos0.. in n_batch pieces; logits for the last (or all)."""
        n_batch = self.options.n_batch
        if self._batch is None:
            self._batch = Batch(n_batch)
        for start in range(0, len(tokens), n_batch):
            part = tokens[start:start + n_batch]
            last = start + len(part) == len(tokens)
            self._batch.fill(part, pos0 + start, seq, logits="all" if all_logits else ("last" if last else "none"))
            self.decode_batch(self._batch)

    def logits(self, i: int = -1) -> np.ndarray:
        ptr = L.llama_get_logits_ith(self.ptr, i)
        if not ptr:
            raise LlamaError(f"no logits for output {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    def all_logits(self, n: int) -> np.ndarray:
        return np.stack([self.logits(i) for i in range(n)])

    def seq_rm(self, seq: int, p0: int, p1: int = -1) -> bool:
        return bool(L.llama_memory_seq_rm(self.memory, seq, p0, p1))

    def clear(self) -> None:
        L.llama_memory_clear(self.memory, True)


@dataclass(frozen=True)
class ProjectorOptions:
    n_threads: int | None = None
    use_gpu: bool = False
    image_min_tokens: int | None = None
    image_max_tokens: int | None = None
    flash_attn: int = L.LLAMA_FLASH_ATTN_TYPE_AUTO
    warmup: bool = False
    eval_callback: Any = None  # a ggml scheduler eval callback (graph_watch.GraphWatch.callback)


class Chunks(_Owned):
    """An owned mtmd_input_chunks list."""

    def __init__(self, ptr: Any):
        self.ptr = ptr

    def _free(self) -> None:
        M.mtmd_input_chunks_free(self.ptr)

    def __len__(self) -> int:
        return M.mtmd_input_chunks_size(self.ptr)

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return M.mtmd_input_chunks_get(self.ptr, i)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def chunk_is_text(chunk: Any) -> bool:
    return M.mtmd_input_chunk_get_type(chunk) == CHUNK_TEXT


def chunk_text_tokens(chunk: Any) -> list[int]:
    n = ctypes.c_size_t()
    ptr = M.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
    return list(ptr[: n.value]) if ptr else []


class Bitmap(_Owned):
    def __init__(self, rgb: np.ndarray, bitmap_id: str | None = None):
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        h, w = rgb.shape[:2]
        self.ptr = M.mtmd_bitmap_init(w, h, rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        if not self.ptr:
            raise LlamaError("mtmd could not create an image bitmap")
        if bitmap_id:
            M.mtmd_bitmap_set_id(self.ptr, bitmap_id.encode())

    def _free(self) -> None:
        M.mtmd_bitmap_free(self.ptr)


class Projector(_Owned):
    """An mtmd context: the vision projector GGUF bound to a text model."""

    def __init__(self, path: str | Path, model: Model, options: ProjectorOptions = ProjectorOptions()):
        ensure_backend()
        self.path, self.model = Path(path), model
        if not self.path.is_file():
            raise LlamaLoadError(f"projector GGUF not found: {self.path}")
        p = M.mtmd_context_params_default()
        p.use_gpu = options.use_gpu
        p.n_threads = options.n_threads or physical_cores()
        p.print_timings = False
        p.warmup = options.warmup
        p.flash_attn_type = options.flash_attn
        if options.image_min_tokens:
            p.image_min_tokens = options.image_min_tokens
        if options.image_max_tokens:
            p.image_max_tokens = options.image_max_tokens
        if options.eval_callback is not None:
            p.cb_eval = options.eval_callback
        take_errors()
        self.ptr = M.mtmd_init_from_file(str(self.path).encode(), model.ptr, p)
        if not self.ptr:
            errors = take_errors()
            raise LlamaLoadError(f"llama.cpp could not load the projector {self.path} for {model.path.name}"
                                 + (": " + " | ".join(errors[-3:]) if errors else ""), errors)
        self.marker = M.mtmd_default_marker().decode()

    def _free(self) -> None:
        M.mtmd_free(self.ptr)

    @property
    def supports_vision(self) -> bool:
        return bool(M.mtmd_support_vision(self.ptr))

    def tokenize(self, text: str, images: Sequence[np.ndarray] = (), ids: Sequence[str | None] = ()) -> Chunks:
        bitmaps = [Bitmap(img, ids[i] if i < len(ids) else None) for i, img in enumerate(images)]
        try:
            data = text.encode("utf-8")
            inp = M.mtmd_input_text(data, len(data), True, True)
            arr = (M.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*[b.ptr for b in bitmaps])
            chunks = Chunks(M.mtmd_input_chunks_init())
            rc = M.mtmd_tokenize(self.ptr, chunks.ptr, ctypes.byref(inp), arr, len(bitmaps))
            if rc != 0:
                chunks.close()
                why = {1: "the number of images does not match the media markers", 2: "image preprocessing failed"}
                raise LlamaError(f"mtmd_tokenize failed: {why.get(rc, f'code {rc}')}")
            return chunks
        finally:
            for b in bitmaps:
                b.close()

    def encode(self, chunk: Any) -> np.ndarray:
        """Image chunk -> embeddings (n_tokens, n_embd_inp): main + deepstack features."""
        rc = M.mtmd_encode_chunk(self.ptr, chunk)
        if rc != 0:
            raise LlamaError(f"mtmd_encode_chunk failed with code {rc}" + log_suffix())
        n = M.mtmd_input_chunk_get_n_tokens(chunk)
        ptr = M.mtmd_get_output_embd(self.ptr)
        return np.ctypeslib.as_array(ptr, shape=(n * self.model.n_embd_inp,)).reshape(n, -1).copy()

    def eval_chunks(self, ctx: Context, chunks: Chunks, n_past: int = 0, seq: int = 0, *, logits_last: bool = True,
                    n_batch: int | None = None) -> int:
        new_past = L.llama_pos(0)
        rc = M.mtmd_helper_eval_chunks(self.ptr, ctx.ptr, chunks.ptr, n_past, seq, n_batch or ctx.options.n_batch,
                                       logits_last, ctypes.byref(new_past))
        if rc != 0:
            raise LlamaError(f"mtmd_helper_eval_chunks failed with code {rc}" + log_suffix())
        return new_past.value
