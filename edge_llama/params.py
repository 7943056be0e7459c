"""The load-parameter builder: every llama_model_params of the project is made here.

Defaults for small devices: read (not mmap) the file when CPU weights are
repacked, at most CPU_UBATCH tokens per forward pass on a CPU, and llama.cpp's
extra buffer types (weight repacking) on, with AMX only where it is known to
work (see `amx.py`).
"""
from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp

from . import amx
from .amx_setting import amx_word, resolve_amx
from .errors import LoadOptionError
from .experts import HOST, TensorOverride

# On a CPU, prompt evaluation is compute-bound: 64 tokens per forward pass
# already run at full speed (2B q4_k_m, 2 cores: 31-33 tok/s at 64, 128 and
# 512), while the compute buffer grows with it (logits are n_ubatch x n_vocab).
CPU_UBATCH = 64



def resolve_mmap(mmap: bool | str, n_gpu_layers: int, repack: bool) -> bool:
    """"auto": read the file instead of mapping it when CPU layers are repacked.

    Repacking copies the CPU matrices into an interleaved layout; with mmap
    the file's pages of those matrices stay resident beside the copy (+670 MB
    for a 2B q4_k_m), so one plain read is smaller. When layers run on a GPU
    (or nothing is repacked) mmap costs nothing and loads faster.
    """
    if mmap == "auto":
        return n_gpu_layers != 0 or not repack
    if isinstance(mmap, bool):
        return mmap
    raise LoadOptionError(f"mmap must be 'auto', True or False, got {mmap!r}")


def resolve_ubatch(n_ubatch: int | None, n_batch: int, n_gpu_layers: int) -> int:
    """None: the whole batch on a GPU, at most CPU_UBATCH tokens on the CPU."""
    if n_ubatch is not None:
        return min(n_ubatch, n_batch)
    return n_batch if n_gpu_layers != 0 else min(n_batch, CPU_UBATCH)


@dataclass(frozen=True)
class LoadOptions:
    """How one model file is loaded (fixed for the life of the model)."""

    n_gpu_layers: int = 0
    mmap: bool | str = "auto"
    repack: bool = True  # llama.cpp's CPU extra buffer types (interleaved weights for faster matmuls)
    amx: bool | str = "auto"  # among them Intel AMX: "auto" = only where a probe showed it works
    placement: Any = None  # placement.Placement: RPC workers and shares (devices, n_gpu_layers, tensor_split)
    # llama.cpp's -ot: tensors to given buffer types, before the placement's and repacking's own
    # (experts.experts_on_host(N) is --n-cpu-moe N)
    overrides: tuple[TensorOverride, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.n_gpu_layers, bool) or not isinstance(self.n_gpu_layers, int):
            raise LoadOptionError(f"n_gpu_layers must be an int, got {self.n_gpu_layers!r}")
        resolve_mmap(self.mmap, self.n_gpu_layers, self.repack)
        amx_word(self.amx)
        if not all(isinstance(o, TensorOverride) for o in self.overrides):
            raise LoadOptionError(f"overrides must be TensorOverride entries, got {self.overrides!r}")


# ggml-cpu/repack.cpp ggml_repack_get_optimal_repack_type, its x86 branches: type -> rows must be a
# multiple of this. Only used where llama.cpp has an AMX buffer type, i.e. x86 builds with AVX-512
# (which AVX2's and AVX-512's rows below need). Q8_0, Q5_K and Q6_K are not repacked on x86.
REPACK_ROWS_X86 = {"Q4_0": 8, "Q4_K": 8, "IQ4_NL": 8, "MXFP4": 8, "Q2_K": 8}
# Weights llama.cpp multiplies with GGML_OP_MUL_MAT (2-D), the only ones CPU_REPACK may hold;
# token_embd is read with GET_ROWS (also when the output is tied to it) and stays in plain CPU memory.
MATMUL_WEIGHT = re.compile(r"^(blk\.\d+\.(attn_(q|k|v|output|qkv)|ffn_(gate|up|down))|output)\.weight$")


def repackable_tensors(path: str | Path) -> list[str]:
    """Names of the weights in a GGUF that CPU_REPACK would take on an x86 CPU."""
    from gguf import GGUFReader

    from .gguf_check import check_gguf

    check_gguf(path)  # gguf-py trusts the lengths too
    out = []
    for t in GGUFReader(str(path)).tensors:
        shape = [int(x) for x in t.shape]  # ggml order: ne0 (row length), ne1 (rows)
        rows = REPACK_ROWS_X86.get(t.tensor_type.name)
        if rows and len(shape) == 2 and shape[1] % rows == 0 and MATMUL_WEIGHT.fullmatch(t.name):
            out.append(t.name)
    return out


OVERRIDE_GROUP = 16


class _Override(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


@dataclass
class ModelParams:
    """A llama_model_params and the C memory its pointers refer to (kept alive with it)."""

    params: Any
    how: str  # one phrase for the log: how the weights are loaded
    keep: list[Any] = field(default_factory=list)


def _buffer_handle(override: TensorOverride, placement: Any) -> int:
    """The ggml buffer type an -ot entry names; the host's plain CPU type keeps llama.cpp's repacking."""
    from .ggml_devices import buffer_types, registry

    if override.buffer == HOST:
        return int(registry().cpu_buffer_type())
    known = buffer_types(placement.workers if placement is not None else ())
    if override.buffer not in known:
        raise LoadOptionError(f"tensor override {override}: no buffer type {override.buffer!r} here; "
                              f"available: {', '.join(sorted(known))}")
    return known[override.buffer]


def build_model_params(path: str | Path, options: LoadOptions = LoadOptions(), *, plan: Any = None) -> ModelParams:
    """llama_model_params for loading `path`; `plan` (an amx.ExtraBufts) skips the AMX decision.

    The one tensor_buft_overrides table, first match wins (llama-model-loader.cpp): the caller's
    overrides (-ot, experts on the host), then the placement's host pins, then CPU_REPACK for the
    weights the AMX fallback keeps repacked (those an earlier pattern takes are left to it).
    """
    mmap = resolve_mmap(options.mmap, options.n_gpu_layers, options.repack)
    if plan is None:
        plan = amx.extra_bufts_plan(options.repack, resolve_amx(options.amx))
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = options.n_gpu_layers
    params.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP if mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
    params.use_extra_bufts = plan.use_extra_bufts
    out = ModelParams(params, f"{'mmap' if mmap else 'read'}, {plan.how}")
    entries: list[tuple[bytes, int]] = [(o.pattern.encode(), _buffer_handle(o, options.placement))
                                        for o in options.overrides]
    if options.placement is not None:
        options.placement.apply(params)
        entries += options.placement.host_pins()
    if plan.repack_overrides:
        taken = [re.compile(pattern.decode()) for pattern, _ in entries]
        names = [n for n in repackable_tensors(path) if not any(p.search(n) for p in taken)]
        # llama.cpp compiles each pattern once per tensor: a few alternations beat one pattern per name
        groups = [names[i:i + OVERRIDE_GROUP] for i in range(0, len(names), OVERRIDE_GROUP)]
        entries += [(("^(" + "|".join(re.escape(n) for n in g) + ")$").encode(), plan.repack_overrides)
                    for g in groups]
        out.how += f" ({len(names)} weights)"
    if options.overrides:
        out.how += ", tensors overridden: " + " ".join(map(str, options.overrides))
    if entries:
        table = (_Override * (len(entries) + 1))()  # ends with a null pattern
        for slot, (pattern, buft) in zip(table, entries):
            slot.pattern, slot.buft = pattern, buft
        params.tensor_buft_overrides = ctypes.cast(table, ctypes.c_void_p)
        out.keep += [table, [pattern for pattern, _ in entries]]
    return out
