"""The vision projector (an mtmd context), its bitmaps and chunk lists, each wrapped once with its cleanup.

mtmd turns a prompt with media markers and bitmaps into chunks (text token
runs, image token blocks), runs the vision encoder on an image chunk, and
knows the decoder positions of its tokens. mtmd_tokenize and
mtmd_encode_chunk are called here and nowhere else; the encoder's graph can be
timed or stopped midway through the projector's `GraphWatch`.
"""
from __future__ import annotations

import ctypes
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import llama_cpp as L
from llama_cpp import mtmd_cpp as M

from .backend import ensure_backend, log_suffix, take_errors
from .errors import LlamaError, LlamaLoadError
from .gguf_check import check_gguf
from .graph_watch import GraphWatch
from .hardware import physical_cores
from .objects import FLASH_ATTN_AUTO, Context, Model
from .owned import Owned

CHUNK_TEXT = getattr(M, "MTMD_INPUT_CHUNK_TYPE_TEXT", 0)
CHUNK_IMAGE = getattr(M, "MTMD_INPUT_CHUNK_TYPE_IMAGE", 1)


def default_marker() -> str:
    """The media marker mtmd replaces with an image's chunk."""
    return M.mtmd_default_marker().decode("utf-8")


@dataclass(frozen=True)
class ProjectorOptions:
    n_threads: int | None = None
    use_gpu: bool = False
    image_min_tokens: int | None = None
    image_max_tokens: int | None = None
    flash_attn: int = FLASH_ATTN_AUTO
    warmup: bool = False
    watch: bool = False  # install a GraphWatch (timing or stopping the encoder's graph); off: no callback at all


class Chunks(Owned):
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


@dataclass(frozen=True)
class ChunkInfo:
    kind: str  # "text" | "image" | "audio"
    tokens: tuple[int, ...]  # text only
    n_tokens: int
    n_pos: int
    id: str  # image: the bitmap id it was made from


def chunk_info(chunk: Any) -> ChunkInfo:
    kind = M.mtmd_input_chunk_get_type(chunk)
    if kind == CHUNK_TEXT:
        tokens = tuple(chunk_text_tokens(chunk))
        return ChunkInfo("text", tokens, len(tokens), len(tokens), "")
    raw_id = M.mtmd_input_chunk_get_id(chunk)
    return ChunkInfo("image" if kind == CHUNK_IMAGE else "audio", (), int(M.mtmd_input_chunk_get_n_tokens(chunk)),
                     int(M.mtmd_input_chunk_get_n_pos(chunk)), raw_id.decode("ascii") if raw_id else "")


def image_grid(chunk: Any) -> tuple[int, int]:
    """(tokens across, tokens down) of an image chunk."""
    tokens = M.mtmd_input_chunk_get_tokens_image(chunk)
    return int(M.mtmd_image_tokens_get_nx(tokens)), int(M.mtmd_image_tokens_get_ny(tokens))


def image_positions(chunk: Any, n_past: int, mrope: bool) -> np.ndarray:
    """Decoder positions of an image chunk's tokens, (sections, n_tokens) as llama.cpp reads an
    embeddings batch: M-RoPE (t, y, x, z) per token from mtmd, or one running position otherwise."""
    n = int(M.mtmd_input_chunk_get_n_tokens(chunk))
    if not mrope:
        return (n_past + np.arange(n, dtype=np.int32))[None, :]
    tokens = M.mtmd_input_chunk_get_tokens_image(chunk)
    out = np.empty((4, n), dtype=np.int32)
    for i in range(n):
        p = M.mtmd_image_tokens_get_decoder_pos(tokens, n_past, i)
        out[0, i], out[1, i], out[2, i], out[3, i] = p.t, p.y, p.x, p.z
    return out


class Bitmap(Owned):
    """An image for mtmd_tokenize: RGB pixels, or only a size (`rgb` None: a placeholder whose
    embeddings come from a cache, so mtmd skips preprocessing). `mergeable`: a video frame mtmd
    may merge with the next one of its size into one temporal group."""

    def __init__(self, rgb: np.ndarray | None, bitmap_id: str | None = None, *, size: tuple[int, int] | None = None,
                 mergeable: bool = False):
        data = None
        if rgb is not None:
            rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
            h, w = rgb.shape[:2]
            data = rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        elif size is not None:
            w, h = size
        else:
            raise LlamaError("a bitmap needs pixels or a size")
        self.ptr = M.mtmd_bitmap_init(w, h, data)
        if not self.ptr:
            raise LlamaError(f"mtmd could not create a {w}x{h} image bitmap")
        if bitmap_id:
            M.mtmd_bitmap_set_id(self.ptr, bitmap_id.encode("ascii"))
        if mergeable:
            M.mtmd_bitmap_set_mergeable(self.ptr, True)

    def _free(self) -> None:
        M.mtmd_bitmap_free(self.ptr)


_TOKENIZE_REASONS = {1: "the number of images does not match the image markers in the prompt",
                     2: "image preprocessing failed"}


class Projector(Owned):
    """An mtmd context: the vision projector GGUF bound to a text model."""

    def __init__(self, path: str | Path, model: Model, options: ProjectorOptions = ProjectorOptions()):
        ensure_backend()
        self.path, self.model = Path(path), model
        if not self.path.is_file():
            raise LlamaLoadError(f"projector GGUF not found: {self.path}")
        check_gguf(self.path, "projector")  # llama.cpp allocates without bound on some header damage
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
        self.watch = GraphWatch() if options.watch else None
        if self.watch is not None:
            p.cb_eval = self.watch.callback
        take_errors()
        self.ptr = M.mtmd_init_from_file(str(self.path).encode(), model.ptr, p)
        if not self.ptr:
            errors = take_errors()
            raise LlamaLoadError(f"llama.cpp could not load the projector {self.path} for {model.path.name}"
                                 + (": " + " | ".join(errors[-3:]) if errors else ""), errors)
        self.marker = default_marker()
        self.supports_vision = bool(M.mtmd_support_vision(self.ptr))
        # image tokens take M-RoPE positions (t, y, x, z) rather than one running position
        self.uses_mrope = bool(M.mtmd_decode_use_mrope(self.ptr))

    def _free(self) -> None:
        M.mtmd_free(self.ptr)

    def tokenize(self, text: str, images: Sequence[np.ndarray | Bitmap] = (), ids: Sequence[str | None] = ()) -> Chunks:
        """`text` with one marker per image -> chunks. Arrays become bitmaps here; every bitmap
        (also one passed in) is freed on return: mtmd_tokenize copied what it needs."""
        bitmaps: list[Bitmap] = []
        try:
            for i, img in enumerate(images):
                bitmaps.append(img if isinstance(img, Bitmap) else Bitmap(img, ids[i] if i < len(ids) else None))
            data = text.encode("utf-8")
            inp = M.mtmd_input_text(data, len(data), True, True)  # mtmd reads exactly text_len bytes
            arr = (M.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*[b.ptr for b in bitmaps])
            chunks = Chunks(M.mtmd_input_chunks_init())
            take_errors()
            rc = M.mtmd_tokenize(self.ptr, chunks.ptr, ctypes.byref(inp), arr, len(bitmaps))
            if rc != 0:
                chunks.close()
                detail = "; ".join(take_errors())
                raise LlamaError(f"mtmd_tokenize: {_TOKENIZE_REASONS.get(rc, f'error {rc}')}"
                                 + (f" ({detail})" if detail else ""))
            return chunks
        finally:
            for b in bitmaps:
                b.close()
            for img in images:
                if isinstance(img, Bitmap):
                    img.close()

    def encode(self, chunk: Any, *, stop: Callable[[], bool] | None = None, copy: bool = True) -> np.ndarray | None:
        """Image chunk -> embeddings (n_tokens, n_embd_inp): main + deepstack features.

        `stop`: checked while the graph runs (needs `watch`); None comes back when it stopped
        the encode (the half-computed output is dropped). copy=False returns mtmd's own
        buffer, valid until the next encode.
        """
        if stop is not None and self.watch is None:
            raise LlamaError("a stoppable encode needs a projector loaded with watch=True")
        take_errors()
        with self.watch.stopping(stop) if stop is not None else nullcontext() as state:
            rc = M.mtmd_encode_chunk(self.ptr, chunk)
        if state is not None and state.stopped:
            return None
        if rc != 0:
            raise LlamaError(f"the vision encoder failed on an image (mtmd_encode_chunk code {rc})" + log_suffix())
        n = M.mtmd_input_chunk_get_n_tokens(chunk)
        ptr = M.mtmd_get_output_embd(self.ptr)
        out = np.ctypeslib.as_array(ptr, shape=(n * self.model.n_embd_inp,)).reshape(n, -1)
        return out.copy() if copy else out

    def decode_image(self, ctx: Context, chunk: Any, embd: np.ndarray, n_past: int, seq: int, n_batch: int) -> int:
        """Evaluate an image chunk's embeddings with mtmd's helper (its positions, its batches); returns n_past after."""
        embd = np.ascontiguousarray(embd, dtype=np.float32)
        new_past = L.llama_pos(0)
        rc = M.mtmd_helper_decode_image_chunk(self.ptr, ctx.ptr, chunk, embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                              n_past, seq, n_batch, ctypes.byref(new_past),
                                              M.mtmd_helper_post_decode_callback(), None)
        if rc != 0:
            raise LlamaError(f"decoding image embeddings failed (code {rc})" + log_suffix())
        return new_past.value

    def eval_chunk(self, ctx: Context, chunk: Any, n_past: int, seq: int = 0, *, logits_last: bool = False,
                   n_batch: int | None = None) -> int:
        """Encode (if an image) and evaluate one chunk with mtmd's helper; returns n_past after."""
        new_past = L.llama_pos(0)
        rc = M.mtmd_helper_eval_chunk_single(self.ptr, ctx.ptr, chunk, n_past, seq, n_batch or ctx.options.n_batch,
                                             logits_last, ctypes.byref(new_past))
        if rc != 0:
            raise LlamaError(f"mtmd_helper_eval_chunk_single failed with code {rc}" + log_suffix())
        return new_past.value

    def eval_chunks(self, ctx: Context, chunks: Chunks, n_past: int = 0, seq: int = 0, *, logits_last: bool = True,
                    n_batch: int | None = None) -> int:
        new_past = L.llama_pos(0)
        rc = M.mtmd_helper_eval_chunks(self.ptr, ctx.ptr, chunks.ptr, n_past, seq, n_batch or ctx.options.n_batch,
                                       logits_last, ctypes.byref(new_past))
        if rc != 0:
            raise LlamaError(f"mtmd_helper_eval_chunks failed with code {rc}" + log_suffix())
        return new_past.value
