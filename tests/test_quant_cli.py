"""edge-convert's quantization flags: --quant (every type), --mmproj-quant, --imatrix, --plan, --keep-f16."""
from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from edge_app.cli import main
from quant import catalog


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_plan_prints_every_type(tiny_model_dir):
    res = run(tiny_model_dir, "--plan", "--ctx-size", "2048", "--cache-type-k", "q8_0", "--cache-type-v", "q8_0")
    assert res.exit_code == 0, res.output
    for q in catalog.names():
        assert re.search(rf"^{q}\s", res.output, re.M), q
    assert "n_ctx 2048, KV cache q8_0" in res.output


# Expected budgets from the runtime's documented table, not from its code: low at most 256 tokens,
# high from the grounding minimum 1024 up to 4096, auto the largest 16*2^k / 24*2^k budget (no
# latency cut before the device is measured); each at most half the context. The tiny checkpoint's
# processor minimum is 8 tokens of 32x32 pixels.
@pytest.mark.parametrize("n_ctx, budgets", [
    (4096, {"low": (8, 256), "auto": (8, 2048), "high": (1024, 2048)}),
    (1000, {"low": (8, 256), "auto": (8, 384), "high": (500, 500)}),
])
def test_plan_shows_image_budgets_per_detail(tiny_model_dir, n_ctx, budgets):
    res = run(tiny_model_dir, "--plan", "--ctx-size", n_ctx)
    assert res.exit_code == 0, res.output
    assert "not measured yet" in res.output and "without the latency cut" in res.output
    for detail, (lo, hi) in budgets.items():
        line = re.search(rf"^  {detail}\s+(\d+)\.\.(\d+)\s+(\d+)x(\d+) grid = (\d+) tokens\s+(\d+)x(\d+) grid = (\d+)",
                         res.output, re.M)
        assert line, (detail, res.output)
        got = [int(x) for x in line.groups()]
        assert got[:2] == [lo, hi], detail
        for (w, h), (gw, gh, n) in zip(((4032, 3024), (640, 480)), (got[2:5], got[5:8])):
            rh, rw = hf_smart_resize(h, w, factor=32, min_pixels=lo * 1024, max_pixels=hi * 1024)
            assert (gw, gh, n) == (rw // 32, rh // 32, (rw // 32) * (rh // 32)), (detail, w, h)


def test_quant_q4_k_m_in_one_run(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    res = run(tiny_model_dir, "-o", out, "--quant", "Q4_K_M", "-q")
    assert res.exit_code == 0, res.output
    m = json.loads(res.output)
    assert m["text"]["type"] == "q4_k_m" and m["mmproj"]["type"] == "q8_0"
    assert (out / m["text"]["path"]).is_file() and (out / m["mmproj"]["path"]).is_file()
    assert not [p for p in out.iterdir() if "f16" in p.name or p.name.startswith(".")]


def test_float_conversion_still_uses_the_converter(tiny_model_dir, tmp_path):
    res = run(tiny_model_dir, "-o", tmp_path, "--quant", "bf16", "-q")
    assert res.exit_code == 0, res.output
    assert "quantization" not in json.loads(res.output)


def test_errors_exit_2_with_the_fix(tiny_model_dir, tmp_path):
    res = run(tiny_model_dir, "-o", tmp_path, "--quant", "iq2_xxs", "-q")
    assert res.exit_code == 2 and "--imatrix auto" in res.output and "llama-imatrix" in res.output
    res = run(tiny_model_dir, "-o", tmp_path, "--quant", "q9_k", "-q")
    assert res.exit_code == 2 and "q4_k_m" in res.output and "iq2_xxs" in res.output
    res = run(tiny_model_dir, "-o", tmp_path, "--quant", "q4_k_m", "--mmproj-quant", "q4_k_m", "-q")
    assert res.exit_code == 2 and "q4_k" in res.output
    res = run(tiny_model_dir, "-o", tmp_path, "--quant", "q4_k_m", "--imatrix", tmp_path / "none.gguf", "-q")
    assert res.exit_code == 2 and "imatrix file not found" in res.output
    assert not list(tmp_path.glob("*.gguf"))
