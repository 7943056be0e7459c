"""The tensors the converter would write for a checkpoint (or a bare config.json), without writing them.

Names and shapes come from the safetensors headers (or, given only a config.json,
from transformers' meta-device model via the model package's reference) mapped by the
architecture's spec; types follow the converter's own rules; metadata bytes are
measured by running the metadata writer into a scratch file. The quantizer's
estimate (quant.estimate) starts from this.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Mapping

import gguf
from gguf import GGMLQuantizationType as G

from edge_common.floats import FLOAT_TYPES
from edge_common.gguf_plan import ModelShapes, TensorSize, natural_key
from edge_models import family_for_hf
from edge_models.spec import ArchSpec

from .checkpoint import Checkpoint, read_json
from .errors import ConvertError
from .pipeline import choose_type, spec_for, transformed_shape, write_file_metadata


def _hf_shapes(source: Path | dict[str, Any]) -> tuple[dict[str, Any], dict[str, tuple[int, ...]] | None, Path | None]:
    """(config, HF tensor name -> shape or None when only a config is known, checkpoint dir or None)."""
    if isinstance(source, dict):
        return source, None, None
    p = Path(source)
    model_dir = p if p.is_dir() else None
    cfg_path = p / "config.json" if p.is_dir() else p
    if not cfg_path.is_file():
        raise ConvertError(f"{p}: no config.json; give a Hugging Face checkpoint folder or its config.json.")
    config = read_json(cfg_path, "config.json")
    if model_dir is not None and any(model_dir.glob("*.safetensors")):
        ckpt = Checkpoint.open(model_dir)
        return ckpt.config, {n: tuple(r.shape) for n, r in ckpt.tensors.items()}, model_dir
    return config, None, model_dir


def model_shapes(source: str | Path | dict[str, Any], intermediate: str = "f16") -> ModelShapes:
    """GGUF tensors (names, shapes, intermediate types) the converter would write for `source`."""
    config, hf, model_dir = _hf_shapes(source if isinstance(source, dict) else Path(source))
    where = "config.json" if isinstance(source, dict) else str(Path(source) / "config.json" if Path(source).is_dir()
                                                              else source)
    spec = spec_for(config, where)
    if hf is None:
        try:
            hf = family_for_hf(config).module("reference").tensor_shapes(config)
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ConvertError(f"estimating from config.json alone needs torch and transformers ({e}).") from e
    ftypes = {"intermediate": G[intermediate.upper()], **FLOAT_TYPES}
    out: dict[str, dict[str, list[TensorSize]]] = {o.role: {k: [] for k in ftypes} for o in spec.outputs}
    for name, shape in hf.items():
        for o in spec.outputs:
            if not o.claims(name):
                continue
            if o.skip(name, config):
                break
            for m in o.map_tensor(name, config, tuple(shape)):
                s = transformed_shape(tuple(shape), m.transform)
                for key, ftype in ftypes.items():
                    ggml_type = G(int(choose_type(m.name, s, ftype, o)))
                    out[o.role][key].append(TensorSize(m.name, tuple(reversed(s)), ggml_type))
            break
    meta = measure_metadata(model_dir, spec) if model_dir is not None else None
    if meta is None:
        meta = guess_metadata(config, {r: len(ts["intermediate"]) for r, ts in out.items()})

    def ordered(ts: list[TensorSize]) -> tuple[TensorSize, ...]:
        return tuple(sorted(ts, key=lambda t: natural_key(t.name)))

    tc = config.get("text_config") or config
    return ModelShapes({r: ordered(ts["intermediate"]) for r, ts in out.items()}, meta, str(model_dir or "config"),
                       {r: {k: ordered(v) for k, v in ts.items() if k != "intermediate"} for r, ts in out.items()},
                       architecture=next((o.gguf_arch for o in spec.outputs if o.role == "text"), None),
                       experts_used=int(tc.get("num_experts_per_tok") or 0))  # the HF key llama.cpp reads too


def measure_metadata(model_dir: Path, spec: ArchSpec) -> dict[str, int] | None:
    """Exact key/value bytes: run the architecture's metadata writer into a scratch file."""
    try:
        ckpt = Checkpoint.open(model_dir)
        sizes = {}
        with tempfile.TemporaryDirectory() as d:
            for o in spec.outputs:
                path = Path(d) / f"{o.role}.gguf"
                w = gguf.GGUFWriter(path, o.gguf_arch)
                write_file_metadata(w, o, ckpt)
                w.write_header_to_file()
                w.write_kv_data_to_file()
                w.close()
                sizes[o.role] = path.stat().st_size - 24  # minus magic, version, tensor and kv counts
        return sizes
    except Exception:  # noqa: BLE001 - e.g. no tokenizer files: fall back to a guess
        return None


def guess_metadata(config: dict[str, Any], n_tensors: Mapping[str, int]) -> dict[str, int]:
    """Without tokenizer files: ~30 bytes per vocabulary entry (token, type, merge) plus fixed keys."""
    tc = config.get("text_config") or config
    n_vocab = int(tc.get("vocab_size") or 0)
    return {role: 2048 + (30 * n_vocab if role == "text" else 0) for role in n_tensors}
