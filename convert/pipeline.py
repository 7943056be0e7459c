"""Checkpoint -> GGUF files + manifest, driven by an architecture spec.

Generic: the architecture module says which tensors go where and what metadata
to write; this module plans every output tensor before writing (so sizes and
free space are known up front), then streams them.
"""
from __future__ import annotations


import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from gguf import GGMLQuantizationType

from edge_common import __version__
from edge_models import ModelConfigError, lookup
from edge_models.spec import ArchSpec, OutputFile, Transform
from .checkpoint import Checkpoint, TensorRef

from .errors import ConvertError
from edge_common.disk import check_free_space, check_overwrite, prepare_out_dir
from edge_common.floats import FLOAT_TYPES
from edge_common.gguf_plan import natural_key
from edge_common.gguf_write import FloatTensor, write_gguf
from edge_common.manifest import MANIFEST, file_entry, sha256_file, write_manifest
from .vocab import write_bpe_vocab

ROW_BLOCK_BYTES = 64 << 20  # float32 working set per write step


@dataclass(frozen=True)
class ConvertOptions:
    """What `convert_checkpoint` was asked for, in one frozen value the pipeline passes down.

    The converter writes float types only (`quant` and `mmproj_quant`: f32, f16 or bf16);
    quantized types go through `edge_app.pipeline.convert_quantized`.
    """

    quant: str = "f16"
    mmproj_quant: str | None = None  # default: the text model's float type
    overwrite: bool = False
    progress: bool = True
    name: str | None = None  # file-name stem; default: the checkpoint folder's name


def choose_type(name: str, shape: tuple[int, ...], ftype: GGMLQuantizationType, out: OutputFile) -> GGMLQuantizationType:
    """llama.cpp's convert rules: vectors and norms stay f32; some loaders need f16/f32."""
    if ftype == GGMLQuantizationType.F32 or len(shape) <= 1 or name.endswith(("_norm.weight", *out.keep_f32)):
        return GGMLQuantizationType.F32
    if name in out.keep_f16_or_f32:
        return GGMLQuantizationType.F16 if ftype == GGMLQuantizationType.F16 else GGMLQuantizationType.F32
    return ftype


def transformed_shape(shape: tuple[int, ...], transform: Transform | None) -> tuple[int, ...]:
    if transform is None:
        return shape
    dummy = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=shape, strides=(0,) * len(shape))
    return tuple(transform(dummy).shape)


def row_blocks(ref: TensorRef, transform: Transform | None, by_rows: bool = False) -> Iterator[np.ndarray]:
    """float32 blocks of the output tensor; whole-tensor transforms load the tensor at once."""
    if (transform is not None and not by_rows) or not ref.shape:
        data = ref.load()
        yield transform(data) if transform is not None else data
        return
    rows = ref.shape[0]
    row_bytes = max(1, ref.n_elements // max(rows, 1) * 4)
    step = max(1, ROW_BLOCK_BYTES // row_bytes)
    for start in range(0, rows, step):
        block = ref.load_rows(start, min(rows, start + step))
        yield np.ascontiguousarray(transform(block)) if transform is not None else block


def plan_output(ckpt: Checkpoint, out: OutputFile, ftype: GGMLQuantizationType) -> list[FloatTensor]:
    planned: dict[str, FloatTensor] = {}
    for src in ckpt.tensors:
        if not out.claims(src) or out.skip(src, ckpt.config):
            continue
        ref = ckpt.tensors[src]
        for m in out.map_tensor(src, ckpt.config, tuple(ref.shape)):
            shape = transformed_shape(ref.shape, m.transform)
            if m.name in planned:
                raise ConvertError(f"{ckpt.model_dir}: two checkpoint tensors map to {m.name!r}; the checkpoint is inconsistent.")
            planned[m.name] = FloatTensor(
                m.name, shape, choose_type(m.name, shape, ftype, out),
                lambda ref=ref, t=m.transform, b=m.by_rows: row_blocks(ref, t, b),
            )
    if not planned:
        raise ConvertError(f"{ckpt.model_dir}: no tensors found for the {out.role} file; is the checkpoint complete?")
    return [planned[k] for k in sorted(planned, key=natural_key)]


def write_file_metadata(writer, out: OutputFile, ckpt: Checkpoint) -> None:
    """The architecture's keys, then the vocabulary when the file carries one."""
    out.write_metadata(writer, ckpt)
    if out.tokenizer is not None:
        write_bpe_vocab(writer, ckpt.model_dir, out.tokenizer.vocab_size(ckpt.config), out.tokenizer.pre,
                        add_bos=out.tokenizer.add_bos)


def check_all_claimed(ckpt: Checkpoint, spec: ArchSpec) -> None:
    stray = [n for n in ckpt.tensors if not any(o.claims(n) for o in spec.outputs)]
    if stray:
        raise ConvertError(
            f"{ckpt.model_dir}: {len(stray)} tensor(s) belong to no part of {spec.name} (first: {stray[0]!r}); "
            "this checkpoint is a different variant."
        )


def float_type(name: str, option: str) -> GGMLQuantizationType:
    if name not in FLOAT_TYPES:
        raise ConvertError(f"{option} {name!r} is not a float type here; choose one of: {', '.join(FLOAT_TYPES)}.")
    return FLOAT_TYPES[name]


def spec_for(config: dict[str, Any], config_path: str = "config.json") -> ArchSpec:
    """The model package's ArchSpec for a config.json (its refusal re-raised as the converter's)."""
    try:
        return lookup(config, config_path)
    except ModelConfigError as e:
        raise ConvertError(str(e)) from None


def model_stem(model_dir: Path, name: str | None) -> str:
    stem = name or model_dir.resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-") or "model"


def convert_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    quant: str = "f16",
    *,
    mmproj_quant: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    name: str | None = None,
) -> dict[str, Any]:
    """Convert a Hugging Face checkpoint into the text GGUF, the projector GGUF and manifest.json."""
    opts = ConvertOptions(quant, mmproj_quant, overwrite, progress, name)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    ckpt = Checkpoint.open(model_dir)
    spec = spec_for(ckpt.config, str(model_dir / "config.json"))
    try:
        spec.validate(ckpt)
    except ModelConfigError as e:
        raise ConvertError(str(e)) from None
    check_all_claimed(ckpt, spec)
    types = {"text": opts.quant, "mmproj": opts.mmproj_quant or opts.quant}
    options = {"text": "--quant", "mmproj": "--mmproj-quant"}
    stem = model_stem(model_dir, opts.name)
    plans = {}
    for out in spec.outputs:
        ftype = float_type(types[out.role], options[out.role])
        plans[out.role] = (out, out_dir / out.file_name(stem, types[out.role]), plan_output(ckpt, out, ftype))
    prepare_out_dir(out_dir, ConvertError)
    check_overwrite([path for _, path, _ in plans.values()] + [out_dir / MANIFEST], opts.overwrite, ConvertError)
    check_free_space(out_dir, sum(t.nbytes for _, _, tensors in plans.values() for t in tensors), "the output",
                     ConvertError)
    manifest: dict[str, Any] = {
        "converter_version": __version__,
        "architecture": spec.name,
        "source": {
            "path": str(model_dir.resolve()),
            "architectures": ckpt.config.get("architectures"),
            "config_sha256": sha256_file(model_dir / "config.json"),
        },
    }
    for role, (out, path, tensors) in plans.items():
        write_gguf(path, out.gguf_arch, lambda w, out=out: write_file_metadata(w, out, ckpt), tensors, progress=opts.progress)
        manifest[role] = file_entry(out_dir, path, types[role], n_tensors=len(tensors))
    return write_manifest(out_dir, manifest)



