"""Quantize a projector (clip) GGUF tensor by tensor with ggml's own quantizer.

llama-quantize only takes text models, so the projector is rewritten here:
every metadata key copied, general.file_type updated, each weight matrix
quantized with ggml_quantize_chunk (the function llama-quantize calls), and
everything llama.cpp's quantizer never touches kept in float: 1-D tensors
(norms, biases), and the multimodal tensors it excludes by name (position and
patch embeddings among them; clip resizes and convolves those in float).
A matrix whose row length does not fit the wanted block size falls back
exactly as llama.cpp's tensor_type_fallback does, and the report lists it.
The output streams row block by row block, so a large projector never sits in
memory, and appears under its final name only when complete.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as G

from edge_common.disk import check_rewrite
from edge_common.gguf_write import write_gguf

from . import catalog
from .errors import QuantError
from .imatrix import Imatrix, resolve
from .report import Fallback, QuantReport, build_report
from .rules import FLOATS, FORCE_F32, allows_quantization, type_fallback

ROW_BLOCK_BYTES = 64 << 20  # float32 working set per quantize step
GGML_QNT_VERSION = 2


@dataclass(frozen=True)
class MmprojQuantOptions:
    quant: str  # projector catalog name: f32 f16 bf16 q8_0 q6_k q5_k q4_k q4_0
    imatrix: Imatrix | str | Path | None = None
    nthread: int = 0  # 0: every core
    progress: bool = True
    overwrite: bool = False


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]  # ggml order (ne0 first)
    src_type: G
    dst_type: G
    fallback: Fallback | None

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dst_type, self.shape)


def tensor_nbytes(t: G, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[t]
    return int(np.prod(shape, dtype=np.int64)) // block * size


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp's rule (quant.rules): 2-D+ '*weight' tensors, minus norms and the excluded multimodal ones."""
    return allows_quantization(name, len(shape))


def kept_type(name: str, src: G, target: G) -> G:
    """Type of a tensor left in float: f32 in an f32 file, else its own f16/f32 (bf16 -> f32)."""
    if target == G.F32 or src not in (G.F32, G.F16) or any(k in name for k in FORCE_F32):
        return G.F32
    return src


def fit_type(name: str, ne0: int, target: G) -> tuple[G, Fallback | None]:
    """The wanted type if ne0 fits its block, else llama.cpp's fallback (f16 when nothing fits)."""
    used = type_fallback(ne0, target)
    if used == target:
        return target, None
    block = GGML_QUANT_SIZES[target][0]
    return used, Fallback(name, target.name, used.name, f"row length {ne0} is not a multiple of {block}")


def plan_tensor(name: str, shape: tuple[int, ...], src: G, target: G) -> TensorPlan:
    if not is_quantizable(name, shape):
        return TensorPlan(name, shape, src, kept_type(name, src, target), None)
    if src not in FLOATS:
        raise QuantError(f"{name} is already {src.name}; quantize from an f32/f16/bf16 projector.")
    dst, fb = fit_type(name, shape[0], target)
    return TensorPlan(name, shape, src, dst, fb)


def plan(reader, target: G) -> list[TensorPlan]:
    return [plan_tensor(t.name, tuple(int(x) for x in t.shape), G(int(t.tensor_type)), target) for t in reader.tensors]


def _float_rows(t, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) (of ne0 elements each) of a reader tensor, as float32."""
    from gguf.quants import dequantize

    src = G(int(t.tensor_type))
    ne0 = int(t.shape[0])
    flat = np.asarray(t.data).reshape(-1)
    if src == G.F32:
        return np.asarray(flat.view(np.float32)[start * ne0: stop * ne0]).reshape(-1, ne0)
    if src == G.F16:
        return flat.view(np.float16)[start * ne0: stop * ne0].astype(np.float32).reshape(-1, ne0)
    block, size = GGML_QUANT_SIZES[src]
    row_bytes = ne0 // block * size
    raw = flat.view(np.uint8)[start * row_bytes: stop * row_bytes].reshape(stop - start, row_bytes)
    return dequantize(raw, src).reshape(-1, ne0)


def _encode(rows: np.ndarray, dst: G, imatrix: np.ndarray | None, nthread: int) -> np.ndarray:
    from . import ggml

    if dst == G.F32:
        return np.ascontiguousarray(rows, dtype="<f4").view(np.uint8).reshape(-1)
    return ggml.quantize(dst, rows, imatrix, nthread=nthread)


def _blocks(t, p: TensorPlan, imatrix: np.ndarray | None, nthread: int) -> Iterator[np.ndarray]:
    ne0 = p.shape[0]
    nrows = p.n_elements // ne0 if p.n_elements else 0
    if p.dst_type == p.src_type:  # copy the stored bytes as they are
        yield np.asarray(t.data).reshape(-1).view(np.uint8)
        return
    step = max(1, ROW_BLOCK_BYTES // (4 * max(ne0, 1)))
    for start in range(0, nrows, step):
        yield _encode(_float_rows(t, start, min(nrows, start + step)), p.dst_type, imatrix, nthread)


@dataclass(frozen=True)
class _QuantizedTensor:
    """One planned tensor of the output, in the shape edge_common.gguf_write.write_gguf streams."""

    source: Any  # gguf.ReaderTensor
    plan: TensorPlan
    imatrix: np.ndarray | None
    nthread: int

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.plan.shape))

    @property
    def ggml_type(self) -> G:
        return self.plan.dst_type

    @property
    def nbytes(self) -> int:
        return self.plan.nbytes

    def encoded_blocks(self) -> Iterator[np.ndarray]:
        return _blocks(self.source, self.plan, self.imatrix, self.nthread)


def _copy_metadata(reader, writer, file_type: int) -> None:
    import gguf

    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE,
                                                    gguf.Keys.General.QUANTIZATION_VERSION):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    writer.add_quantization_version(GGML_QNT_VERSION)
    writer.add_file_type(file_type)


def _imatrix_for(im: Imatrix | None, p: TensorPlan) -> np.ndarray | None:
    if im is None or p.dst_type in FLOATS:
        return None
    v = im.values(p.name)
    if v is None:
        return None
    if v.size != p.shape[0]:
        raise QuantError(f"{im.label}: {p.name} has {v.size} imatrix values for rows of {p.shape[0]}; "
                         "it was computed for another model. Use --imatrix auto.")
    return v


def quantize_mmproj(src: str | Path, dst: str | Path, options: MmprojQuantOptions) -> QuantReport:
    """Rewrite the projector `src` as `dst` with options.quant (see the module doc for the rules)."""
    import gguf

    qt = catalog.lookup_projector(options.quant)
    src, dst = Path(src), Path(dst)
    check_rewrite(src, dst, options.overwrite, "projector", QuantError)
    im = resolve(options.imatrix)
    reader = gguf.GGUFReader(src)
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    arch = arch_field.contents() if arch_field is not None else "clip"
    plans = plan(reader, qt.ggml_type)
    nthread = options.nthread or os.cpu_count() or 1
    tensors = [_QuantizedTensor(t, p, _imatrix_for(im, p), nthread) for t, p in zip(reader.tensors, plans)]
    write_gguf(dst, arch, lambda w: _copy_metadata(reader, w, qt.ftype), tensors, progress=options.progress)
    n_imatrix = sum(t.imatrix is not None for t in tensors)
    fallbacks = tuple(p.fallback for p in plans if p.fallback is not None)
    return build_report(dst, qt.name, fallbacks=fallbacks, imatrix=im.label if im is not None else None,
                        imatrix_entries=n_imatrix)
