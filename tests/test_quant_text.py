"""Text-model quantization through llama.cpp's own quantizer."""
from __future__ import annotations

import hashlib

import gguf
import pytest

from quant.errors import QuantError
from quant.report import read_tensors
from quant.text import TextQuantOptions, quantize_text
from test_quant_support import WIDE_SPEC, pair_of, wide_imatrix


@pytest.fixture(scope="module")
def wide_text(artifacts):
    return pair_of(artifacts.converted(WIDE_SPEC, "f16"))[0]


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def llama_quantize(src, dst, quant: str) -> None:
    """What `llama-quantize SRC DST TYPE` does (tools/quantize/quantize.cpp without options): default params,
    the type's ftype, then llama_model_quantize. llama-cpp-python does not build the tool's binary, so the
    reference calls the same library function the tool calls, with the tool's parameters."""
    from edge_llama.quantize import quantize_file
    from quant import catalog

    quantize_file(src, dst, catalog.lookup(quant).ftype)  # llama_model_quantize with the default params


@pytest.mark.parametrize("quant", ["q4_k_m", "q6_k", "q8_0"])
def test_same_tensors_and_bytes_as_llama_quantize(wide_text, tmp_path, quant):
    ours = quantize_text(wide_text, tmp_path / "ours.gguf", TextQuantOptions(quant, progress=False))
    llama_quantize(wide_text, tmp_path / "ref.gguf", quant)
    ref = read_tensors(tmp_path / "ref.gguf")
    assert [(t.name, t.ggml_type, t.shape, t.n_bytes) for t in ours.tensors] == \
           [(t.name, t.ggml_type, t.shape, t.n_bytes) for t in ref]
    assert sha(tmp_path / "ours.gguf") == sha(tmp_path / "ref.gguf")
    assert ours.file_bytes == (tmp_path / "ref.gguf").stat().st_size


def test_q4_k_m_mix_on_wide_rows(wide_text, tmp_path):
    r = quantize_text(wide_text, tmp_path / "q4.gguf", TextQuantOptions("q4_k_m", progress=False))
    types = r.types()
    assert types["blk.1.attn_q.weight"] == "Q4_K"
    assert types["token_embd.weight"] == "Q6_K"  # tied embeddings take the output tensor's type
    assert {types[f"blk.{i}.ffn_down.weight"] for i in range(4)} <= {"Q4_K", "Q6_K"}
    assert "Q6_K" in {types[f"blk.{i}.attn_v.weight"] for i in range(4)}
    assert types["output_norm.weight"] == "F32"
    assert not r.fallbacks
    assert gguf.GGUFReader(tmp_path / "q4.gguf").get_field("general.file_type").contents() == 15


def test_narrow_rows_fall_back_and_are_reported(tiny_f16_dir, tmp_path):
    src = pair_of(tiny_f16_dir)[0]
    r = quantize_text(src, tmp_path / "q.gguf", TextQuantOptions("q4_k_m", progress=False))
    fb = {f.tensor: f for f in r.fallbacks}
    assert fb["blk.0.attn_q.weight"].used == "Q5_0" and fb["blk.0.attn_q.weight"].wanted == "Q4_K"
    assert r.types()["blk.0.attn_q.weight"] == "Q5_0"


def test_iq2_xxs_refuses_without_imatrix(wide_text, tmp_path):
    with pytest.raises(QuantError) as e:
        quantize_text(wide_text, tmp_path / "x.gguf", TextQuantOptions("iq2_xxs", progress=False))
    msg = str(e.value)
    assert "importance matrix" in msg and "--imatrix auto" in msg and "--imatrix FILE" in msg and "llama-imatrix" in msg
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.torch
def test_imatrix_changes_bytes_and_is_recorded(artifacts, wide_text, tmp_path):
    im = wide_imatrix(artifacts)
    plain = quantize_text(wide_text, tmp_path / "a.gguf", TextQuantOptions("iq4_xs", progress=False))
    with_im = quantize_text(wide_text, tmp_path / "b.gguf", TextQuantOptions("iq4_xs", imatrix=im, progress=False))
    assert with_im.imatrix_entries >= 4 * 7  # every linear layer of the 4 text blocks
    assert sha(tmp_path / "a.gguf") != sha(tmp_path / "b.gguf")
    keys = gguf.GGUFReader(tmp_path / "b.gguf").fields
    assert keys["quantize.imatrix.file"].contents() == str(im)
    assert keys["quantize.imatrix.entries_count"].contents() == with_im.imatrix_entries
    assert plain.imatrix is None and with_im.imatrix == str(im)


@pytest.mark.torch
def test_iq2_xxs_runs_with_an_imatrix(artifacts, wide_text, tmp_path):
    r = quantize_text(wide_text, tmp_path / "iq2.gguf",
                      TextQuantOptions("iq2_xxs", imatrix=wide_imatrix(artifacts), progress=False))
    assert r.types()["blk.2.attn_q.weight"] == "IQ2_XXS"


def test_existing_output_needs_overwrite(wide_text, tmp_path):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"x")
    with pytest.raises(QuantError, match="--overwrite"):
        quantize_text(wide_text, out, TextQuantOptions("q8_0", progress=False))
    quantize_text(wide_text, out, TextQuantOptions("q8_0", progress=False, overwrite=True))
    assert out.stat().st_size > 1000


def test_llama_cpp_failure_is_a_quant_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(QuantError, match="could not quantize"):
        quantize_text(bad, tmp_path / "o.gguf", TextQuantOptions("q8_0", progress=False))
