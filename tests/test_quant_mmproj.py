"""Projector quantization with ggml's quantizer; the results load and run in mtmd."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from quant.errors import QuantError
from quant.mmproj import MmprojQuantOptions, fit_type, is_quantizable, quantize_mmproj
from quant.quality import ModelPair, check_projector, image_cosines
from test_quant_support import WIDE_SPEC, pair_of, reference_projector, wide_imatrix


@pytest.fixture(scope="module")
def wide(artifacts, tmp_path_factory):
    text, mm = pair_of(artifacts.converted(WIDE_SPEC, "f16"))
    ref = reference_projector(mm, tmp_path_factory.mktemp("mm") / "mmproj-ref-f16.gguf")
    return text, mm, ref


@pytest.fixture(scope="module")
def quantized(wide, tmp_path_factory):
    text, mm, _ = wide
    d = tmp_path_factory.mktemp("mmq")
    return {q: quantize_mmproj(mm, d / f"mmproj-{q}.gguf", MmprojQuantOptions(q, progress=False))
            for q in ("q8_0", "q4_k")}


def test_q8_0_and_q4_k_embeddings_match_f16_in_mtmd(wide, quantized, test_image):
    text, _, ref = wide
    images = [test_image, test_image.resize((160, 128))]
    for q, floor in (("q8_0", 0.999), ("q4_k", 0.99)):
        cos = image_cosines(ModelPair(text, ref), ModelPair(text, quantized[q].path), images, threads=1)
        assert len(cos) == 2
        assert min(c for c, _ in cos) >= floor, (q, cos)


def test_tensor_rules(wide, quantized):
    r = quantized["q4_k"]
    types = r.types()
    assert types["v.blk.0.attn_qkv.weight"] == "Q4_K"
    assert types["mm.0.weight"] == "Q4_K"
    assert types["v.position_embd.weight"] == "F32"  # clip interpolates it in F32
    assert types["v.patch_embd.weight"] == "F16" and types["v.patch_embd.weight.1"] == "F16"
    assert types["v.blk.0.ln1.weight"] == "F32" and types["v.blk.0.attn_qkv.bias"] == "F32"
    assert not r.fallbacks
    assert set(quantized["q8_0"].type_counts()) == {"F16", "F32", "Q8_0"}


def test_metadata_is_copied_and_file_type_updated(wide, quantized):
    src = gguf.GGUFReader(wide[1])
    dst = gguf.GGUFReader(quantized["q8_0"].path)
    for k, f in src.fields.items():
        if k.startswith("GGUF.") or k in ("general.file_type", "general.quantization_version"):
            continue
        assert dst.fields[k].contents() == f.contents(), k
    assert dst.fields["general.file_type"].contents() == 7
    assert dst.fields["general.quantization_version"].contents() == 2
    assert [t.name for t in dst.tensors] == [t.name for t in src.tensors]


def test_dequantized_weights_are_close(wide, quantized):
    src = {t.name: t for t in gguf.GGUFReader(wide[1]).tensors}
    for t in gguf.GGUFReader(quantized["q8_0"].path).tensors:
        a = gguf.quants.dequantize(np.asarray(src[t.name].data), src[t.name].tensor_type).astype(np.float32)
        b = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 0.02 * max(1e-6, np.abs(a).max()), t.name


def test_narrow_rows_fall_back_like_llama_cpp(tiny_f16_dir, tmp_path):
    mm = pair_of(tiny_f16_dir)[1]
    r = quantize_mmproj(mm, tmp_path / "m.gguf", MmprojQuantOptions("q4_k", progress=False))
    fb = {f.tensor: f for f in r.fallbacks}
    assert fb["v.blk.0.attn_qkv.weight"].used == "Q5_0" and "64" in fb["v.blk.0.attn_qkv.weight"].reason
    assert r.types()["mm.0.weight"] == "Q4_K"  # 256-wide rows fit
    assert fit_type("x", 64, gguf.GGMLQuantizationType.Q6_K)[0] == gguf.GGMLQuantizationType.Q8_0
    assert fit_type("x", 48, gguf.GGMLQuantizationType.Q8_0)[0] == gguf.GGMLQuantizationType.F16


def test_quantizable_rule():
    assert is_quantizable("v.blk.0.attn_qkv.weight", (64, 192))
    assert not is_quantizable("v.blk.0.attn_qkv.bias", (192,))
    assert not is_quantizable("v.position_embd.weight", (64, 256))
    assert not is_quantizable("v.patch_embd.weight", (16, 16, 3, 64))


@pytest.mark.torch
def test_imatrix_changes_projector_bytes(artifacts, wide, tmp_path):
    im = wide_imatrix(artifacts)
    a = quantize_mmproj(wide[1], tmp_path / "a.gguf", MmprojQuantOptions("q4_k", progress=False))
    b = quantize_mmproj(wide[1], tmp_path / "b.gguf", MmprojQuantOptions("q4_k", imatrix=im, progress=False))
    assert b.imatrix_entries > 0 and a.imatrix_entries == 0
    assert a.path.read_bytes() != b.path.read_bytes() and a.file_bytes == b.file_bytes


def test_errors(wide, tmp_path):
    with pytest.raises(QuantError, match="q4_k_m"):
        quantize_mmproj(wide[1], tmp_path / "x.gguf", MmprojQuantOptions("q4_k_m", progress=False))
    with pytest.raises(QuantError, match="not found"):
        quantize_mmproj(tmp_path / "missing.gguf", tmp_path / "x.gguf", MmprojQuantOptions("q8_0"))
    assert not list(tmp_path.glob("*.partial"))


def test_clip_position_embedding_guard(tmp_path, wide):
    check_projector(wide[2])
    d = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(d, "clip")
    w.add_tensor("v.position_embd.weight", np.zeros((4, 8), np.float16))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(QuantError, match="F32"):
        check_projector(d)
