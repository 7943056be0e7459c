"""Shared pieces of the quantization tests (no tests here).

The tiny synthetic model's rows (64 values) are narrower than the 256-value
blocks of k-quants, so llama.cpp falls back to 32-block types for every
tensor; WIDE_SPEC has 256-wide rows so q4_k_m, q6_k and the imatrix types
really produce their own types, while staying small enough for two CPU cores.
"""
from __future__ import annotations

from pathlib import Path

from edge_models.qwen3vl.synthetic import SyntheticSpec, TextShape, VisionShape

WIDE_SPEC = SyntheticSpec(
    text=TextShape(hidden=256, ff=512, layers=4, heads=4, kv_heads=1, head_dim=64, mrope_section=(8, 12, 12),
                   max_positions=4096),
    vision=VisionShape(depth=2, hidden=256, ff=512, heads=4, patch=16, merge=2, num_positions=256, deepstack=(0,)),
    seed=3,
)


def pair_of(out_dir: Path) -> tuple[Path, Path]:
    """(text, mmproj) paths recorded in a converted folder's manifest."""
    import json

    m = json.loads((Path(out_dir) / "manifest.json").read_text())
    return Path(out_dir) / m["text"]["path"], Path(out_dir) / m["mmproj"]["path"]


def reference_projector(src: Path, dst: Path) -> Path:
    """The f16 projector rewritten by quant.mmproj (F32 position embeddings, as clip needs)."""
    from quant.mmproj import MmprojQuantOptions, quantize_mmproj

    if not dst.exists():
        quantize_mmproj(src, dst, MmprojQuantOptions("f16", progress=False))
    return dst


def sparse_f16_text_gguf(config: dict, tokenizer_dir: Path, path: Path, shapes=None) -> Path:
    """A text GGUF with the config's real shapes whose data is a sparse hole (zeros, no disk).

    llama_model_quantize in dry-run mode reads only the header, so this gives
    llama.cpp's exact per-tensor types and sizes for a 2B model in seconds.
    """
    import gguf
    import numpy as np

    from convert.checkpoint import Checkpoint
    from convert.pipeline import spec_for, write_file_metadata
    from convert.shapes import model_shapes

    shapes = shapes or model_shapes(config)
    ckpt = Checkpoint(tokenizer_dir, config, {})
    text = next(o for o in spec_for(config).outputs if o.role == "text")
    w = gguf.GGUFWriter(path, text.gguf_arch)
    write_file_metadata(w, text, ckpt)
    total = 0
    for t in shapes.tensors["text"]:
        w.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np.float32), t.nbytes, raw_dtype=t.ggml_type)
        total += -(-t.nbytes // 32) * 32
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    f = w.fout[0]
    w.write_padding(f, f.tell())
    f.truncate(f.tell() + total)
    w.close()
    return path


def wide_imatrix(artifacts) -> Path:
    """An imatrix computed once per test session for the WIDE_SPEC model (cached as a file)."""
    from quant.imatrix import save
    from quant.imatrix_compute import ImatrixOptions, compute_imatrix

    path = artifacts.root / "wide-imatrix.gguf"
    if not path.exists():
        im = compute_imatrix(artifacts.model(WIDE_SPEC), None, ImatrixOptions(max_samples=6, progress=False))
        save(im, path)
    return path


def assert_types_match_llama_cpp(config: dict, shapes, tmp_path: Path) -> None:
    """Every non-float type, with and without an imatrix: the estimate's per-tensor types and quantized
    bytes equal llama.cpp's dry run on a sparse f16 file with these shapes."""
    from edge_models.qwen3vl.synthetic import train_tokenizer, write_tokenizer
    from quant import catalog, estimate as E

    write_tokenizer(tmp_path, train_tokenizer(300))
    sparse = sparse_f16_text_gguf(config, tmp_path, tmp_path / "sparse-f16.gguf", shapes)
    for q in [q for q in catalog.names() if not catalog.lookup(q).is_float]:
        for with_imatrix in (False, True):
            real, quant_mib = llama_cpp_dry_run(sparse, q, with_imatrix)
            est = E.estimate(shapes, q, imatrix=with_imatrix)
            assert est.text.types() == real, (q, with_imatrix)
            assert abs(est.text.tensor_bytes / 2**20 - quant_mib) < 0.01, (q, with_imatrix)


def llama_cpp_dry_run(sparse: Path, quant: str, with_imatrix: bool) -> tuple[dict[str, str], float]:
    """llama_model_quantize's own per-tensor types (name -> type) and quantized MiB, without reading data.

    dry_run types every tensor from the header alone; one imatrix entry is enough to switch
    llama.cpp's has_imatrix branches (iq3_xxs, iq4_*, q4_0/q5_0 ffn_down) on.
    """
    import re

    import numpy as np

    from edge_llama import capture
    from edge_llama.quantize import quantize_file
    from quant import catalog

    line = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[.*?\], type =\s+(\S+),"
                      r"(?:\s+size =\s+[\d.]+ MiB ->\s+[\d.]+ MiB \((\S+)\))?")
    one = {"blk.0.attn_q.weight": np.ones(2048, dtype=np.float32)}
    with capture() as log:
        quantize_file(sparse, "", catalog.lookup(quant).ftype, dry_run=True, imatrix=one if with_imatrix else None)
    real = {m[1]: (m[3] or m[2]).upper() for m in line.finditer(log.text)}
    return real, float(re.search(r"quant size\s+=\s+([\d.]+) MiB", log.text)[1])
