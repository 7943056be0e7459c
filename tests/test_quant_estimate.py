"""Size and memory estimates from shapes alone, checked against the files llama.cpp and we write."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from convert.shapes import model_shapes
from quant import catalog, estimate as E
from quant.mmproj import MmprojQuantOptions, quantize_mmproj
from quant.report import read_tensors
from quant.text import TextQuantOptions, quantize_text
from test_quant_support import WIDE_SPEC, assert_types_match_llama_cpp, pair_of, wide_imatrix

# every test reads shapes from a checkpoint or transformers' meta-device model
pytestmark = pytest.mark.torch

CONFIG_2B = Path(__file__).parent / "data" / "qwen3-vl-2b-instruct.config.json"  # the hub's config.json


@pytest.fixture(scope="module")
def wide(artifacts):
    return artifacts.model(WIDE_SPEC), pair_of(artifacts.converted(WIDE_SPEC, "f16"))


@pytest.fixture(scope="module")
def wide_shapes(wide):
    return model_shapes(wide[0])


# Imatrix types whose (slow) search quantizers run here; every type's mix is also checked on the 2B shapes below.
QUANTIZED_HERE = [q for q in catalog.names() if not catalog.lookup(q).is_float and
                  (not catalog.lookup(q).needs_imatrix or q in ("iq2_xxs", "iq3_s", "iq1_s", "q2_k_s"))]


def test_text_types_match_llama_cpp_tensor_by_tensor(artifacts, wide, wide_shapes, tmp_path):
    src = wide[1][0]
    im = wide_imatrix(artifacts)
    for q in QUANTIZED_HERE:
        t = catalog.lookup(q)
        out = tmp_path / f"{q}.gguf"
        r = quantize_text(src, out, TextQuantOptions(q, imatrix=im if t.needs_imatrix else None, progress=False))
        est = E.estimate(wide_shapes, q)
        assert est.text.types() == r.types(), q
        assert abs(est.text.bytes - r.file_bytes) <= 0.03 * r.file_bytes, q
        assert est.text.tensor_bytes == sum(x.n_bytes for x in r.tensors), q
        out.unlink()


def test_float_files_are_predicted_exactly(artifacts, tiny_model_dir, tiny_f16_dir, tiny_f32_dir):
    shapes = model_shapes(tiny_model_dir)
    for d, q in ((tiny_f16_dir, "f16"), (tiny_f32_dir, "f32")):
        text, mm = pair_of(d)
        e = E.estimate(shapes, q)
        assert e.text.bytes == text.stat().st_size
        assert e.mmproj.bytes == mm.stat().st_size
        assert e.text.types() == {t.name: t.ggml_type for t in read_tensors(text)}


@pytest.mark.parametrize("mq", ["q8_0", "q4_k", "q6_k", "f16"])
def test_projector_sizes(wide, wide_shapes, tmp_path, mq):
    r = quantize_mmproj(wide[1][1], tmp_path / "m.gguf", MmprojQuantOptions(mq, progress=False))
    e = E.estimate(wide_shapes, "q4_k_m", mq)
    assert e.mmproj.types() == r.types()
    assert e.mmproj.bytes == r.file_bytes


def test_runtime_memory_parts(wide_shapes):
    e = E.estimate(wide_shapes, "q4_k_m", n_ctx=1000, kv_type="q8_0")
    # 4 layers, one KV head of 64, q8_0 rows of 64 = 2 blocks of 34 bytes, 1024 cells after padding
    assert e.kv_bytes == 4 * 2 * 68 * 1024
    assert e.total_runtime_bytes == e.weights_bytes + e.kv_bytes + e.compute_bytes + e.vision_compute_bytes
    assert e.compute_bytes > 0 and e.vision_compute_bytes > 0
    assert E.estimate(wide_shapes, "q4_k_m", n_ctx=1000, kv_type="f16").kv_bytes == 2 * e.kv_bytes * 64 // 68


def test_plan_table_lists_every_type(wide_shapes):
    rows = E.plan_table(wide_shapes, n_ctx=2048)
    assert [r.quant for r in rows] == list(catalog.names())
    sizes = {r.quant: r.text.bytes for r in rows}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > sizes["q6_k"] > sizes["q4_k_m"] > sizes["q2_k"]
    text = E.format_plan(rows)
    for q in catalog.names():
        assert re.search(rf"^{q}\s", text, re.M), q
    assert "required" in text and "n_ctx 2048" in text


@pytest.fixture(scope="module")
def shapes_2b():
    cfg = json.loads(CONFIG_2B.read_text())
    return cfg, model_shapes(cfg)  # transformers meta-device shapes, no weights


def test_2b_shapes_match_llama_cpp_dry_run(shapes_2b, tmp_path):
    """The real 2B shapes (k-quant blocks fit, 28 layers of use_more_bits): llama.cpp's own types and sizes."""
    cfg, shapes = shapes_2b
    assert_types_match_llama_cpp(cfg, shapes, tmp_path)
    e = E.estimate(shapes, "q4_k_m", n_ctx=4096)
    assert 1.05e9 < e.text.bytes < 1.15e9  # the published Q4_K_M file of Qwen3-VL-2B-Instruct is 1.11 GB
    assert e.kv_bytes == 448 * 2**20  # llama.cpp: "KV buffer size = 448.00 MiB" at n_ctx 4096
    assert abs(e.compute_bytes / (320.75 * 2**20) - 1) < 0.03  # llama.cpp: "compute buffer size = 320.75 MiB"
    assert abs(e.vision_compute_bytes / (322.49 * 2**20) - 1) < 0.05  # mtmd warmup: 322.49 MiB
