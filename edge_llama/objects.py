"""The text model and its context, each wrapped once with its cleanup (as llama-cpp-python's `_internals.py`).

Nothing above this layer calls llama.cpp: the runtime, the server, quant's
quality evaluation, the bench workers and the tests build these objects (and
the batches of `batch`, the projector of `projector`, the samplers of
`sampler`). Pointers are owned here and freed on close() (or when the object
is collected); failures become LlamaLoadError / LlamaError naming the file and
carrying llama.cpp's error lines.
"""
from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import llama_cpp as L

from .batch import Batch
from .backend import capture, ensure_backend, log_suffix, take_errors
from .errors import LlamaError, LlamaLoadError
from .gguf_check import check_gguf
from .kv_pages import anonymous_mappings, host_kv_bytes, release_zeroed_kv
from .hardware import physical_cores
from .owned import Owned
from .params import LoadOptions, build_model_params

log = logging.getLogger("edge_llama")

# llama_flash_attn_type
FLASH_ATTN_AUTO, FLASH_ATTN_ON, FLASH_ATTN_OFF = (L.LLAMA_FLASH_ATTN_TYPE_AUTO, L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                                  L.LLAMA_FLASH_ATTN_TYPE_DISABLED)


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


class Model(Owned):
    """A text GGUF; `how` says how its weights were loaded (mmap/read, AMX/repack/plain)."""

    def __init__(self, path: str | Path, options: LoadOptions = LoadOptions(), *, plan: Any = None,
                 what: str = "text model"):
        ensure_backend()
        self.path = Path(path)
        if not self.path.is_file():
            raise LlamaLoadError(f"{what} not found: {self.path}")
        check_gguf(self.path, what)  # llama.cpp aborts or allocates without bound on some damage
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
        self.n_params = int(L.llama_model_n_params(self.ptr))
        self.n_layer = int(L.llama_model_n_layer(self.ptr))
        self.n_head = int(L.llama_model_n_head(self.ptr))
        self.n_head_kv = int(L.llama_model_n_head_kv(self.ptr))

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
        """The bytes of one token; special=False renders control tokens (<|im_end|>) as b""."""
        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:max(n, 0)]

    def is_eog(self, token: int) -> bool:
        """The vocab flags `token` as end of generation."""
        return bool(L.llama_vocab_is_eog(self.vocab, token))

    def special_token_text(self, which: str) -> str | None:
        """Text of the "bos" or "eos" token (None when the vocab has none)."""
        token = {"bos": L.llama_vocab_bos, "eos": L.llama_vocab_eos}[which](self.vocab)
        if token < 0:
            return None
        text = L.llama_vocab_get_text(self.vocab, token)
        return text.decode("utf-8", errors="replace") if text else None

    @property
    def chat_template(self) -> str | None:
        raw = L.llama_model_chat_template(self.ptr, None)
        return raw.decode("utf-8") if raw else None

@dataclass(frozen=True)
class ContextOptions:
    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    n_seq_max: int = 1
    n_threads: int | None = None
    type_k: int = L.GGML_TYPE_F16
    type_v: int = L.GGML_TYPE_F16
    flash_attn: int = FLASH_ATTN_AUTO
    no_perf: bool = True
    eval_callback: Any = None  # a ggml scheduler eval callback (graph_watch.GraphWatch.callback)
    lazy_kv: bool = True  # hand llama.cpp's zeroed KV pages back until used (kv_pages; Linux)


# llama_decode's return codes (llama.h); the one table of them
DECODE_REASONS = {1: "no free KV-cache slot (raise n_ctx)", 2: "aborted", -1: "invalid batch"}


class Context(Owned):
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
        before = anonymous_mappings() if options.lazy_kv else []
        with capture() as cap:
            self.ptr = L.llama_init_from_model(model.ptr, p)
        self.kv_released_bytes = release_zeroed_kv(before, host_kv_bytes(cap.text)) if self.ptr and before else 0
        if not self.ptr:
            errors = take_errors()
            raise LlamaLoadError(f"{model.path}: llama.cpp could not create a context (n_ctx={options.n_ctx})"
                                 + (": " + " | ".join(errors[-3:]) if errors else "; try a smaller n_ctx"), errors)
        self.memory = L.llama_get_memory(self.ptr)
        self.n_ctx = int(L.llama_n_ctx(self.ptr))
        self.n_ctx_seq = int(L.llama_n_ctx_seq(self.ptr))  # cells one sequence may use
        self.n_batch, self.n_ubatch = int(L.llama_n_batch(self.ptr)), int(L.llama_n_ubatch(self.ptr))
        self._batch: Any = None  # Context.decode's own batch, made on first use

    def _free(self) -> None:
        if self._batch is not None:
            self._batch.close()
        L.llama_free(self.ptr)

    def decode_batch(self, batch: Any) -> None:
        """The one llama_decode of the project: a token `Batch` or an `EmbeddingBatch`."""
        rc = L.llama_decode(self.ptr, batch.raw)
        if rc != 0:
            reason = DECODE_REASONS.get(rc, "fatal error")
            raise LlamaError(f"llama_decode failed on {batch.raw.n_tokens} {batch.what}: {reason} (code {rc})"
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

    def logits_view(self, i: int = -1) -> np.ndarray:
        """The logits of batch output `i` in place: writing to it changes what the next sample reads."""
        ptr = L.llama_get_logits_ith(self.ptr, i)
        if not ptr:
            raise LlamaError(f"no logits for output {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def logits_block(self, n: int) -> np.ndarray:
        """The logits of the batch's first `n` outputs as one (n, n_vocab) array, in place (llama.cpp keeps
        the outputs contiguous, in batch order): one view for a step's rows instead of one per row."""
        ptr = L.llama_get_logits(self.ptr)
        if not ptr:
            raise LlamaError("no logits")
        return np.ctypeslib.as_array(ptr, shape=(n, self.model.n_vocab))

    def logits(self, i: int = -1) -> np.ndarray:
        return self.logits_view(i).copy()

    def all_logits(self, n: int) -> np.ndarray:
        return np.stack([self.logits(i) for i in range(n)])

    def seq_rm(self, seq: int, p0: int, p1: int = -1) -> bool:
        return bool(L.llama_memory_seq_rm(self.memory, seq, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Make `dst` hold `src`'s cells in [p0, p1) too: the cells are shared, not duplicated."""
        L.llama_memory_seq_cp(self.memory, src, dst, p0, p1)

    def seq_pos_range(self, seq: int) -> tuple[int, int]:
        """(min, max) position held by `seq`; (-1, -1) when it is empty."""
        return int(L.llama_memory_seq_pos_min(self.memory, seq)), int(L.llama_memory_seq_pos_max(self.memory, seq))

    def clear(self) -> None:
        L.llama_memory_clear(self.memory, True)

    # llama.cpp serialises a sequence (cell positions, M-RoPE extras, K and V rows) with
    # llama_state_seq_get_data and reads it back with _set_data, which checks layer count,
    # types and row sizes and clears the destination first.

    def seq_state_size(self, seq: int) -> int:
        return int(L.llama_state_seq_get_size(self.ptr, seq))

    def seq_state_bytes(self, seq: int) -> bytearray:
        """The serialised KV cells of `seq`, written straight into a bytearray (hundreds of MB: one copy)."""
        size = self.seq_state_size(seq)
        data = bytearray(size)
        buf = (ctypes.c_uint8 * size).from_buffer(data)
        written = int(L.llama_state_seq_get_data(self.ptr, buf, size, seq))
        del buf  # release the export so the bytearray may be resized/freed
        if written != size:
            raise LlamaError(f"llama_state_seq_get_data wrote {written} of {size} bytes for sequence {seq}")
        return data

    def load_seq_state(self, seq: int, data: bytearray) -> bool:
        """Replace `seq`'s cells with `data`; False when llama.cpp refuses it (the sequence is then empty)."""
        buf = (ctypes.c_uint8 * len(data)).from_buffer(data)
        try:
            return int(L.llama_state_seq_set_data(self.ptr, buf, len(data), seq)) > 0
        finally:
            del buf
