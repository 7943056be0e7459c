"""Importance matrices: computed from the reference model with images, llama.cpp's formats, checks."""
from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from quant import imatrix as imx
from quant.calibration import load_calibration
from quant.imatrix_check import check as check_imatrix
from quant.imatrix_compute import ImatrixOptions, compute_imatrix
from quant.errors import QuantError
from test_quant_support import WIDE_SPEC, pair_of, wide_imatrix


@pytest.fixture(scope="module")
def wide_pair(artifacts):
    text, mm = pair_of(artifacts.converted(WIDE_SPEC, "f16"))
    return {"text": text, "mmproj": mm}


@pytest.fixture(scope="module")
def auto(artifacts):
    return imx.load(wide_imatrix(artifacts))


@pytest.mark.torch
def test_auto_imatrix_loads_back_and_names_only_existing_tensors(auto, wide_pair):
    cov = check_imatrix(auto, wide_pair)  # raises on unknown names or sizes
    assert cov["text"].fraction == 1.0  # every linear layer of the language model (and the tied output)
    assert "token_embd.weight" in cov["text"].covered
    assert {"v.blk.0.attn_qkv.weight", "mm.0.weight", "v.deepstack.0.fc1.weight"} <= set(cov["mmproj"].covered)
    assert set(cov["mmproj"].missing) == {"v.patch_embd.weight", "v.position_embd.weight"}  # not linear layers
    e = auto.entries["blk.0.attn_q.weight"]
    assert e.sums.shape == (1, 256) and e.counts[0] > 0 and np.all(e.sums >= 0)
    assert auto.chunk_count == 6 and auto.datasets == ("builtin:synthetic-images+questions",)


@pytest.mark.torch
def test_vision_layers_saw_image_patches(auto):
    # Every calibration image runs through the vision tower: its layers count patches, not text tokens.
    assert auto.entries["v.blk.0.attn_qkv.weight"].counts[0] >= 4 * 16
    assert auto.entries["mm.0.weight"].counts[0] * 4 == auto.entries["v.blk.0.attn_qkv.weight"].counts[0]


@pytest.mark.torch
def test_gguf_format_is_llama_cpps(auto, tmp_path):
    path = imx.save(auto, tmp_path / "im.gguf")
    r = gguf.GGUFReader(path)
    assert r.get_field("general.type").contents() == "imatrix"
    assert r.get_field("general.architecture") is None
    assert r.get_field("imatrix.chunk_count").contents() == auto.chunk_count
    assert r.get_field("imatrix.datasets").contents() == list(auto.datasets)
    t = {x.name: x for x in r.tensors}
    assert list(t["blk.0.ffn_down.weight.in_sum2"].shape) == [512, 1]  # ne0 = columns, ne1 = matrices
    assert list(t["blk.0.ffn_down.weight.counts"].shape) == [1, 1]
    back = imx.load(path)
    for name in auto.entries:
        np.testing.assert_allclose(back.values(name), auto.values(name), rtol=1e-6)


@pytest.mark.torch
def test_legacy_dat_round_trip(auto, tmp_path):
    path = imx.save_legacy(auto, tmp_path / "im.dat")
    raw = path.read_bytes()
    assert struct.unpack_from("<i", raw)[0] == len(auto.entries)
    back = imx.load(path)
    assert back.legacy
    for name in auto.entries:
        np.testing.assert_allclose(back.values(name), auto.values(name), rtol=1e-5)
    # and converts to the GGUF format with the same values
    again = imx.load(imx.save(back, tmp_path / "again.gguf"))
    np.testing.assert_allclose(again.values("mm.2.weight"), auto.values("mm.2.weight"), rtol=1e-5)


@pytest.mark.torch
def test_imatrix_for_another_model_is_refused(auto, wide_pair, tiny_f16_dir):
    tiny_text, tiny_mm = pair_of(tiny_f16_dir)
    with pytest.raises(QuantError, match="columns .* another model|another model"):
        check_imatrix(auto, {"text": tiny_text, "mmproj": tiny_mm})
    foreign = imx.Imatrix({**auto.entries, "blk.99.attn_q.weight": auto.entries["blk.0.attn_q.weight"]})
    with pytest.raises(QuantError, match="does not have .*blk.99.attn_q.weight"):
        check_imatrix(foreign, wide_pair)
    sparse = auto.subset(["blk.0.attn_q.weight"])
    with pytest.raises(QuantError, match="covers only 1 of"):
        check_imatrix(sparse, wide_pair)


def test_bad_files(tmp_path):
    with pytest.raises(QuantError, match="--imatrix auto"):
        imx.load(tmp_path / "nope.gguf")
    (tmp_path / "junk.dat").write_bytes(b"\xff\xff\xff\xff")
    with pytest.raises(QuantError, match="not an imatrix"):
        imx.load(tmp_path / "junk.dat")


def test_calibration_directory(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (48, 64), (10, 200, 10)).save(tmp_path / "b.jpg")
    (tmp_path / "prompts.txt").write_text("What is red?\n\nDescribe it.\n")
    samples = load_calibration(tmp_path)
    assert [(s.prompt, s.image is not None) for s in samples] == [
        ("What is red?", True), ("Describe it.", True), ("What is red?", False), ("Describe it.", False)]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QuantError, match="nothing to calibrate"):
        load_calibration(empty)


@pytest.mark.torch
def test_compute_with_user_calibration(artifacts, tmp_path):
    from PIL import Image

    Image.new("RGB", (96, 64), (20, 40, 200)).save(tmp_path / "blue.png")
    (tmp_path / "prompts.txt").write_text("What color is this?\n")
    im = compute_imatrix(artifacts.model(), tmp_path, ImatrixOptions(progress=False))
    assert im.chunk_count == 2 and im.datasets == (str(tmp_path.resolve()),)
    assert "v.blk.0.attn_qkv.weight" in im.entries and "blk.0.ffn_down.weight" in im.entries
