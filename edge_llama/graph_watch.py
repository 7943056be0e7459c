"""Watching a ggml graph as the scheduler computes it: timing each node, stopping it midway.

llama.cpp has no per-op timer for mtmd; ggml's scheduler has an eval callback
(`cb_eval`, which mtmd_context_params passes on): it asks the callback about every
node, computes the nodes the callback wants on their own, then reports each one.
Asking for every node therefore runs the graph one node at a time, timed; asking
for none leaves the graph as one computation (the callback then costs ~1 us a
node). So a `GraphWatch` is installed once, at load, and acts only inside
`timing()` (the encoder profile) or `stopping()` (a cancelled request's encode).
"""
from __future__ import annotations

import ctypes
import functools
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import llama_cpp

from .ggml_devices import open_lib

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64
BUFFER_USAGE_WEIGHTS = 1  # enum ggml_backend_buffer_usage


class GgmlTensor(ctypes.Structure):
    """The head of `struct ggml_tensor` (ggml.h), as far as the fields read here."""


GgmlTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
    ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(GgmlTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * GGML_MAX_NAME),
]


@dataclass(frozen=True)
class NodeTime:
    index: int
    op: str  # ggml_op_desc: MUL_MAT, FLASH_ATTN_EXT, GELU, ...
    name: str
    weight: str | None  # GGUF name of the model tensor the node reads, views resolved
    weight_type: str | None  # its ggml type (q8_0, f16, ...)
    flops: float  # matrix products and attention only; 0 for element-wise ops
    seconds: float


@functools.lru_cache(maxsize=1)
def _ggml() -> ctypes.CDLL:
    base = open_lib("ggml-base")
    if base is None:
        raise OSError("libggml-base not found next to llama_cpp")
    for name, args, res in (("ggml_op_desc", [ctypes.c_void_p], ctypes.c_char_p),
                            ("ggml_type_name", [ctypes.c_int], ctypes.c_char_p),
                            ("ggml_backend_buffer_get_usage", [ctypes.c_void_p], ctypes.c_int)):
        fn = getattr(base, name)
        fn.argtypes, fn.restype = args, res
    return base


def _base_of(t: GgmlTensor) -> GgmlTensor:
    while t.view_src:
        t = t.view_src.contents
    return t


def _weight_of(t: GgmlTensor) -> GgmlTensor | None:
    """The first source that lives in a weights buffer (a model tensor), else None."""
    lib = _ggml()
    for ptr in t.src:
        if not ptr:
            continue
        src = _base_of(ptr.contents)
        if src.buffer and lib.ggml_backend_buffer_get_usage(src.buffer) == BUFFER_USAGE_WEIGHTS:
            return src
    return None


def _rows(t: GgmlTensor) -> int:
    return t.ne[1] * t.ne[2] * t.ne[3]


def node_flops(op: str, t: GgmlTensor) -> float:
    """Multiply-adds x 2 of a matrix product or flash attention; the rest is memory-bound and counts 0."""
    if op == "MUL_MAT" and t.src[0] and t.src[1]:
        return 2.0 * t.src[0].contents.ne[0] * t.ne[0] * _rows(t)
    if op == "FLASH_ATTN_EXT" and t.src[0] and t.src[1] and t.src[2]:
        q, k, v = (t.src[i].contents for i in range(3))
        # q: [d, n_q, heads, b]; k: [d, n_kv, ...]; scores and the weighted sum of values
        return 2.0 * q.ne[1] * q.ne[2] * q.ne[3] * k.ne[1] * (q.ne[0] + v.ne[0])
    return 0.0


def describe(t: GgmlTensor, index: int, seconds: float) -> NodeTime:
    lib = _ggml()
    op = (lib.ggml_op_desc(ctypes.addressof(t)) or b"?").decode()
    weight = _weight_of(t)
    return NodeTime(index=index, op=op, name=t.name.decode(errors="replace"),
                    weight=weight.name.decode(errors="replace") if weight is not None else None,
                    weight_type=lib.ggml_type_name(weight.type).decode() if weight is not None else None,
                    flops=node_flops(op, t), seconds=seconds)


# Nodes between two stop checks: the graph then runs in ~25 pieces for a 24-block encoder (each
# piece one more thread-pool dispatch), so a stop lands within ~4% of an encode.
STOP_CHECK_EVERY = 32


class StopState:
    stopped: bool = False


class GraphWatch:
    """A scheduler eval callback installed once, at load.

    Inside `timing()` it asks for every node and times it; inside `stopping(pred)`
    the graph runs in pieces and stops at the first piece boundary where pred()
    is true (mtmd has no abort hook of its own). Otherwise it asks for nothing.
    The callback must ask for a node to regain control: the scheduler asks about
    every node of a piece before it computes any of them.
    """

    def __init__(self) -> None:
        self._timing_lock, self._stop_lock = threading.Lock(), threading.Lock()  # one block of each kind at a time
        self._nodes: list[NodeTime] | None = None
        self._stop: Callable[[], bool] | None = None
        self._state = StopState()
        self._asked_at = 0.0
        self._count = 0
        # kept on the instance: ggml holds only the C pointer
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_node)

    def _on_node(self, tensor: int, ask: bool, _user_data: int) -> bool:
        nodes, stop = self._nodes, self._stop
        if nodes is None and stop is None:
            return False  # nothing wanted: the scheduler computes the graph in one piece
        if ask:
            self._count += 1
            self._asked_at = time.perf_counter()
            return nodes is not None or self._count % STOP_CHECK_EVERY == 0
        try:
            if nodes is not None:
                nodes.append(describe(ctypes.cast(tensor, ctypes.POINTER(GgmlTensor)).contents, len(nodes),
                                      time.perf_counter() - self._asked_at))
            if stop is not None and stop():
                self._state.stopped = True
                return False  # the scheduler leaves the rest of the graph uncomputed
        except Exception:  # a callback must not raise into C; an unreadable node is just not recorded
            pass
        return True

    @contextmanager
    def timing(self) -> Iterator[list[NodeTime]]:
        """Record every node computed inside the block into the yielded list."""
        nodes: list[NodeTime] = []
        with self._timing_lock:
            self._nodes = nodes
            try:
                yield nodes
            finally:
                self._nodes = None

    @contextmanager
    def stopping(self, should_stop: Callable[[], bool]) -> Iterator[StopState]:
        """Stop graphs computed inside the block once should_stop() is true; the yielded state says if one
        was. A stopped graph's output is garbage: the caller must drop it."""
        state = StopState()
        with self._stop_lock:
            self._stop, self._state, self._count = should_stop, state, 0
            try:
                yield state
            finally:
                self._stop = None
