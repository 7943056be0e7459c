"""Checkpoint -> quantized pair + manifest in one call (what `edge-convert --quant q4_k_m` runs)."""
from __future__ import annotations

import hashlib

import pytest

from edge_common.manifest import read_manifest
from quant import estimate as E
from quant.errors import QuantError
from convert.shapes import model_shapes
from edge_app.pipeline import QuantizeOptions, convert_quantized, needs_quant_pipeline
from edge_common.disk import check_free_space
from quant.quality import QualityOptions
from quant.report import read_tensors
from test_quant_support import WIDE_SPEC

FAST_QUALITY = QualityOptions(prompts=("The quick brown fox",), image_prompts=("Describe this image.",),
                              continuation=4, threads=1, image_size=(128, 96))


def sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def q4(artifacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("q4")
    model = artifacts.model(WIDE_SPEC)
    manifest = convert_quantized(model, out, QuantizeOptions(
        "q4_k_m", imatrix="auto", report=True, progress=False, imatrix_samples=4, quality=FAST_QUALITY))
    return model, out, manifest


@pytest.mark.torch
def test_outputs_and_manifest(q4):
    model, out, m = q4
    text, mm = out / m["text"]["path"], out / m["mmproj"]["path"]
    assert text.name.endswith("-q4_k_m.gguf") and mm.name.startswith("mmproj-") and mm.name.endswith("-q8_0.gguf")
    for role, path in (("text", text), ("mmproj", mm)):
        assert m[role]["sha256"] == sha(path) and m[role]["bytes"] == path.stat().st_size
    assert m["text"]["type"] == "q4_k_m" and m["mmproj"]["type"] == "q8_0"
    types = {t.name: t.ggml_type for t in read_tensors(text)}
    assert m["quantization"]["text"]["tensor_types"] == dict(sorted(
        {k: list(types.values()).count(k) for k in set(types.values())}.items()))
    assert m["quantization"]["mmproj"]["tensor_types"]["Q8_0"] > 0
    assert read_manifest(out) == m
    # the f16 intermediate and its temp folder are gone; the imatrix stays for reuse
    assert sorted(p.name for p in out.iterdir()) == sorted([text.name, mm.name, "manifest.json", "imatrix.gguf"])


@pytest.mark.torch
def test_imatrix_and_quality_recorded(q4):
    _, out, m = q4
    assert m["imatrix"]["path"] == str(out / "imatrix.gguf")
    assert m["imatrix"]["coverage"]["text"].split("/")[0] == m["imatrix"]["coverage"]["text"].split("/")[1]
    assert m["quantization"]["text"]["imatrix_entries"] > 0
    q = m["quality"]
    assert q["ref"] == "f16 intermediate" and q["overall"]["positions"] > 0
    assert 0 <= q["overall"]["kl_mean"] < 0.1 and q["overall"]["top1_agreement"] > 0.5
    assert q["image_cosine_min"] > 0.99


@pytest.mark.torch
def test_plan_is_within_3_percent_of_what_was_written(q4):
    model, out, m = q4
    e = E.estimate(model_shapes(model), "q4_k_m", "q8_0", imatrix=True)
    written = {role: (out / m[role]["path"]).stat().st_size for role in ("text", "mmproj")}  # the files themselves
    assert abs(e.text.bytes - written["text"]) <= 0.03 * written["text"]
    assert abs(e.mmproj.bytes - written["mmproj"]) <= 0.03 * written["mmproj"]
    recorded = m["quantization"]["estimate"]  # what the manifest says the plan was: also within 3% of the files
    assert abs(recorded["text_bytes"] - written["text"]) <= 0.03 * written["text"]
    assert abs(recorded["mmproj_bytes"] - written["mmproj"]) <= 0.03 * written["mmproj"]


@pytest.mark.torch
def test_keep_f16_and_float_projector(artifacts, tmp_path):
    m = convert_quantized(artifacts.model(WIDE_SPEC), tmp_path, QuantizeOptions(
        "q8_0", mmproj_quant="f16", keep_f16=True, progress=False))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.endswith("-f16.gguf") and not n.startswith("mmproj") for n in names)
    assert set(m["intermediate"]) == {"text"}  # the f16 projector is the output itself
    assert m["mmproj"]["type"] == "f16"
    types = {t.name: t.ggml_type for t in read_tensors(tmp_path / m["mmproj"]["path"])}
    assert types["v.position_embd.weight"] == "F32"
    assert not [n for n in names if n.startswith(".edge-convert-")]


@pytest.mark.torch
def test_refusals_happen_before_writing(artifacts, tmp_path):
    model = artifacts.model(WIDE_SPEC)
    with pytest.raises(QuantError, match="--imatrix auto"):
        convert_quantized(model, tmp_path / "a", QuantizeOptions("iq2_xxs", progress=False))
    with pytest.raises(QuantError, match="--imatrix auto"):
        convert_quantized(model, tmp_path / "b", QuantizeOptions("q4_k_m", calibration=tmp_path, progress=False))
    with pytest.raises(QuantError, match="choose one of"):
        convert_quantized(model, tmp_path / "c", QuantizeOptions("q4_k_x", progress=False))
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in "abc")


def test_disk_space_message(tmp_path):
    with pytest.raises(QuantError, match=r"needs 1000 TB free for the f16 intermediate .* has"):
        check_free_space(tmp_path, 10**15, "the f16 intermediate", QuantError)


@pytest.mark.torch
def test_existing_outputs_need_overwrite(q4, artifacts):
    model, out, _ = q4
    with pytest.raises(QuantError, match="--overwrite"):
        convert_quantized(model, out, QuantizeOptions("q4_k_m", progress=False))


def test_which_runs_need_the_quant_pipeline():
    assert not needs_quant_pipeline("f16", None)
    assert not needs_quant_pipeline("bf16", "f32")
    assert needs_quant_pipeline("q4_k_m", None)
    assert needs_quant_pipeline("f16", "q8_0")
    assert needs_quant_pipeline("f16", None, report=True)
