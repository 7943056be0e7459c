"""File sizes and runtime memory for every quantization type, before anything is quantized.

Starts from the converter's tensor list (convert.shapes.model_shapes: names,
shapes, float types, metadata bytes). The text model's per-tensor types follow
llama.cpp's llama_tensor_get_type (quant.rules, applied by quant.tensor_types),
the projector's quant.mmproj's rule; file sizes follow GGUF's layout
(quant.layout). Runtime memory = weights + KV cache (exact, as llama.cpp
allocates it) + compute buffers (an estimate, quant.memory).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from edge_common.gguf_plan import ModelShapes, TensorSize, natural_key
from edge_models import family_for_gguf

from . import catalog, kv
from .errors import QuantError
from .layout import QUANT_KEYS, gguf_file_bytes, imatrix_keys
from .memory import TextDims, compute_bytes, vision_compute_bytes
from .tensor_types import mmproj_types, text_types

EXPERT_TENSOR = "_exps."  # llama.cpp's merged expert tensors: blk.N.ffn_{gate,up,down}_exps.weight


@dataclass(frozen=True)
class FileEstimate:
    role: str
    quant: str
    bytes: int
    tensor_bytes: int
    tensors: tuple[TensorSize, ...]

    def type_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(t.ggml_type.name for t in self.tensors).items()))

    def types(self) -> dict[str, str]:
        return {t.name: t.ggml_type.name for t in self.tensors}


@dataclass(frozen=True)
class Estimate:
    quant: str
    mmproj_quant: str
    n_ctx: int
    kv_type: str
    text: FileEstimate
    mmproj: FileEstimate | None
    kv_bytes: int
    compute_bytes: int  # text-model compute buffer (estimate)
    vision_compute_bytes: int  # projector compute buffer for one large image (estimate)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def disk_bytes(self) -> int:
        return self.text.bytes + (self.mmproj.bytes if self.mmproj else 0)

    @property
    def weights_bytes(self) -> int:
        return self.text.tensor_bytes + (self.mmproj.tensor_bytes if self.mmproj else 0)

    @property
    def experts_bytes(self) -> int:
        """MoE expert weights (ffn_*_exps): what `-ot exps=CPU` keeps in host RAM; 0 for a dense model."""
        return sum(t.nbytes for t in self.text.tensors if EXPERT_TENSOR in t.name)

    @property
    def total_runtime_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes + self.vision_compute_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant": self.quant, "mmproj_quant": self.mmproj_quant, "n_ctx": self.n_ctx, "kv_type": self.kv_type,
            "text_bytes": self.text.bytes, "mmproj_bytes": self.mmproj.bytes if self.mmproj else 0,
            "kv_bytes": self.kv_bytes, "compute_bytes": self.compute_bytes,
            "vision_compute_bytes": self.vision_compute_bytes, "total_runtime_bytes": self.total_runtime_bytes,
            "text_tensor_types": self.text.type_counts(),
        }


def estimate(shapes: ModelShapes, quant: str = "q4_k_m", mmproj_quant: str | None = None,
             n_ctx: int = 4096, kv_type: str = "f16", *, imatrix: bool | None = None,
             kv_type_v: str | None = None) -> Estimate:
    """Sizes of the files `edge-convert --quant QUANT --mmproj-quant M` writes, and the memory to run them."""
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
        raise QuantError(f"n_ctx must be a positive number of tokens, got {n_ctx!r} (--ctx-size).")
    qt = catalog.lookup(quant)
    mq = catalog.lookup_projector(mmproj_quant or catalog.default_projector_type(quant))
    has_imatrix = qt.needs_imatrix if imatrix is None else imatrix
    text_meta = shapes.metadata_bytes["text"]
    if qt.is_float:  # the converter writes float files itself
        text_ts = tuple(sorted(shapes.as_float("text", qt.name), key=lambda x: natural_key(x.name)))
    else:  # llama-quantize: its own tensor order, two more keys (four more with an imatrix)
        text_ts = tuple(text_types(shapes.tensors["text"], qt.name, imatrix=has_imatrix))
        text_meta += QUANT_KEYS + (imatrix_keys() if has_imatrix else 0)
    text = FileEstimate("text", qt.name, gguf_file_bytes(text_meta, text_ts), sum(t.nbytes for t in text_ts), text_ts)
    mm = None
    if "mmproj" in shapes.tensors:
        meta = shapes.metadata_bytes["mmproj"]
        if qt.is_float and mq.is_float:  # the converter alone writes both files
            mm_ts = shapes.as_float("mmproj", mq.name)
        else:
            mm_ts = tuple(mmproj_types(shapes.tensors["mmproj"], mq.name))
            meta += QUANT_KEYS
        mm = FileEstimate("mmproj", mq.name, gguf_file_bytes(meta, mm_ts), sum(t.nbytes for t in mm_ts), mm_ts)
    d = TextDims.of(text_ts, shapes.experts_used)
    kvb = kv.kv_bytes_for_rows(d.n_layer, d.k_row, d.v_row, n_ctx, kv_type, kv_type_v)
    return Estimate(qt.name, mq.name, n_ctx, kv.kv_type(kv_type).name, text, mm, kvb, compute_bytes(d, n_ctx),
                    vision_compute_bytes(mm.tensors, family_for_gguf(shapes.architecture).vision) if mm else 0)


def plan_table(shapes: ModelShapes, n_ctx: int = 4096, kv_type: str = "f16",
               quants: Iterable[str] | None = None, mmproj_quant: str | None = None,
               kv_type_v: str | None = None) -> list[Estimate]:
    """One estimate per type (every catalog type by default; imatrix types assume one is given)."""
    return [estimate(shapes, q, mmproj_quant, n_ctx, kv_type, kv_type_v=kv_type_v) for q in (quants or catalog.names())]


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"


def format_plan(rows: list[Estimate]) -> str:
    """The --plan table: sizes in MB (10^6 bytes); an MoE model also gets the split with experts in host RAM."""
    moe = any(e.experts_bytes for e in rows)
    head = ("type", "bpw", "text MB", "mmproj", "mmproj MB", "KV MB", "compute MB", "run MB") + \
        (("experts MB", "rest MB"), ())[not moe] + ("imatrix",)
    lines = [head]
    for e in rows:
        t = catalog.lookup(e.quant)
        n = sum(int(np.prod(x.shape)) for x in e.text.tensors)
        split = (_mb(e.experts_bytes), _mb(e.total_runtime_bytes - e.experts_bytes)) if moe else ()
        lines.append((e.quant, f"{8 * e.text.tensor_bytes / n:.2f}", _mb(e.text.bytes), e.mmproj_quant,
                      _mb(e.mmproj.bytes) if e.mmproj else "-", _mb(e.kv_bytes),
                      _mb(e.compute_bytes + e.vision_compute_bytes), _mb(e.total_runtime_bytes), *split,
                      "required" if t.needs_imatrix else ""))
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    left = (0, 3, len(head) - 1)
    out = ["  ".join(c.rjust(w) if i not in left else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
           for r in lines]
    if rows:
        out.append(f"(n_ctx {rows[0].n_ctx}, KV cache {rows[0].kv_type}; run MB = weights + KV + compute buffers)")
        if moe:
            out.append("(experts MB: the expert weights, in host RAM with llama.cpp's -ot exps=CPU; rest MB: what "
                       "then stays on the GPU)")
    return "\n".join(out)
