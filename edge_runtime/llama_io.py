"""Thin, safe wrappers over llama-cpp-python's low-level C API (llama + mtmd).

Shared by the runtime, the quality measurements and the tests, so each of them
calls llama.cpp the same way: models, contexts, token decoding with logits,
projector tokenization, image encoding and chunk evaluation. Pointers are owned
by these objects and freed on close(); errors become LlamaError with the file.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import llama_cpp as L
from llama_cpp import mtmd_cpp as M

from .backend import ensure_backend, model_params, physical_cores

CHUNK_TEXT = M.MTMD_INPUT_CHUNK_TYPE_TEXT if hasattr(M, "MTMD_INPUT_CHUNK_TYPE_TEXT") else 0


class LlamaError(RuntimeError):
    """llama.cpp refused a file or an operation."""


def model_meta(model_ptr, key: str) -> str | None:
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


class Model:
    def __init__(self, path: str | Path, *, n_gpu_layers: int = 0, mmap: bool = True, repack: bool = True):
        ensure_backend()
        self.path = Path(path)
        if not self.path.is_file():
            raise LlamaError(f"{self.path}: model file not found")
        params = model_params(n_gpu_layers, mmap=mmap, repack=repack)
        self.ptr = L.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.ptr:
            raise LlamaError(f"{self.path}: llama.cpp could not load this GGUF (run with EDGE_VERBOSE=1 for its log)")
        self.vocab = L.llama_model_get_vocab(self.ptr)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_embd = L.llama_model_n_embd(self.ptr)
        self.n_embd_inp = L.llama_model_n_embd_inp(self.ptr)  # n_embd x (1 + deepstack layers)

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

    def close(self) -> None:
        if getattr(self, "ptr", None):
            L.llama_model_free(self.ptr)
            self.ptr = None


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


class Context:
    def __init__(self, model: Model, options: ContextOptions = ContextOptions()):
        self.model, self.options = model, options
        p = L.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = options.n_ctx, options.n_batch, options.n_ubatch, options.n_seq_max
        threads = options.n_threads or physical_cores()
        p.n_threads = p.n_threads_batch = threads
        p.type_k, p.type_v, p.flash_attn_type = options.type_k, options.type_v, options.flash_attn
        self.ptr = L.llama_init_from_model(model.ptr, p)
        if not self.ptr:
            raise LlamaError(f"{model.path}: could not create a context (n_ctx={options.n_ctx}); try a smaller n_ctx")
        self.memory = L.llama_get_memory(self.ptr)

    @property
    def n_ctx(self) -> int:
        return L.llama_n_ctx(self.ptr)

    def decode(self, tokens: Sequence[int], pos0: int = 0, seq: int = 0, *, all_logits: bool = False) -> None:
        """Decode tokens at positions pos0.. in n_batch pieces; logits for the last (or all)."""
        n_batch = self.options.n_batch
        batch = L.llama_batch_init(n_batch, 0, 1)
        try:
            for start in range(0, len(tokens), n_batch):
                part = tokens[start:start + n_batch]
                batch.n_tokens = len(part)
                for i, tok in enumerate(part):
                    batch.token[i] = tok
                    batch.pos[i] = pos0 + start + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = all_logits or start + i == len(tokens) - 1
                rc = L.llama_decode(self.ptr, batch)
                if rc != 0:
                    raise LlamaError(f"llama_decode failed with code {rc} at position {pos0 + start}")
        finally:
            L.llama_batch_free(batch)

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

    def close(self) -> None:
        if getattr(self, "ptr", None):
            L.llama_free(self.ptr)
            self.ptr = None


@dataclass(frozen=True)
class ProjectorOptions:
    n_threads: int | None = None
    use_gpu: bool = False
    image_min_tokens: int | None = None
    image_max_tokens: int | None = None
    flash_attn: int = L.LLAMA_FLASH_ATTN_TYPE_AUTO
    warmup: bool = False


class Chunks:
    """An owned mtmd_input_chunks list."""

    def __init__(self, ptr):
        self.ptr = ptr

    def __len__(self) -> int:
        return M.mtmd_input_chunks_size(self.ptr)

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return M.mtmd_input_chunks_get(self.ptr, i)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def close(self) -> None:
        if self.ptr:
            M.mtmd_input_chunks_free(self.ptr)
            self.ptr = None


def chunk_is_text(chunk) -> bool:
    return M.mtmd_input_chunk_get_type(chunk) == CHUNK_TEXT


def chunk_text_tokens(chunk) -> list[int]:
    n = ctypes.c_size_t()
    ptr = M.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
    return list(ptr[: n.value]) if ptr else []


class Projector:
    def __init__(self, path: str | Path, model: Model, options: ProjectorOptions = ProjectorOptions()):
        ensure_backend()
        self.path, self.model = Path(path), model
        if not self.path.is_file():
            raise LlamaError(f"{self.path}: projector file not found")
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
        self.ptr = M.mtmd_init_from_file(str(self.path).encode(), model.ptr, p)
        if not self.ptr:
            raise LlamaError(f"{self.path}: mtmd could not load this projector for {model.path.name}")
        self.marker = M.mtmd_default_marker().decode()

    def bitmap(self, rgb: np.ndarray, bitmap_id: str | None = None):
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        h, w = rgb.shape[:2]
        bmp = M.mtmd_bitmap_init(w, h, rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        if not bmp:
            raise LlamaError("mtmd could not create an image bitmap")
        if bitmap_id:
            M.mtmd_bitmap_set_id(bmp, bitmap_id.encode())
        return bmp

    def tokenize(self, text: str, images: Sequence[np.ndarray] = (), ids: Sequence[str | None] = ()) -> Chunks:
        bitmaps = [self.bitmap(img, ids[i] if i < len(ids) else None) for i, img in enumerate(images)]
        try:
            data = text.encode("utf-8")
            inp = M.mtmd_input_text(data, len(data), True, True)
            arr = (M.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            chunks = Chunks(M.mtmd_input_chunks_init())
            rc = M.mtmd_tokenize(self.ptr, chunks.ptr, ctypes.byref(inp), arr, len(bitmaps))
            if rc != 0:
                chunks.close()
                why = {1: "the number of images does not match the media markers", 2: "image preprocessing failed"}
                raise LlamaError(f"mtmd_tokenize failed: {why.get(rc, f'code {rc}')}")
            return chunks
        finally:
            for b in bitmaps:
                M.mtmd_bitmap_free(b)

    def encode(self, chunk) -> np.ndarray:
        """Image chunk -> embeddings (n_tokens, n_embd_inp): main + deepstack features."""
        rc = M.mtmd_encode_chunk(self.ptr, chunk)
        if rc != 0:
            raise LlamaError(f"mtmd_encode_chunk failed with code {rc}")
        n = M.mtmd_input_chunk_get_n_tokens(chunk)
        ptr = M.mtmd_get_output_embd(self.ptr)
        return np.ctypeslib.as_array(ptr, shape=(n * self.model.n_embd_inp,)).reshape(n, -1).copy()

    def eval_chunks(self, ctx: Context, chunks: Chunks, n_past: int = 0, seq: int = 0, *, logits_last: bool = True) -> int:
        new_past = L.llama_pos(0)
        rc = M.mtmd_helper_eval_chunks(self.ptr, ctx.ptr, chunks.ptr, n_past, seq, ctx.options.n_batch, logits_last,
                                       ctypes.byref(new_past))
        if rc != 0:
            raise LlamaError(f"mtmd_helper_eval_chunks failed with code {rc}")
        return new_past.value

    def close(self) -> None:
        if getattr(self, "ptr", None):
            M.mtmd_free(self.ptr)
            self.ptr = None
