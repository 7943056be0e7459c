"""edge-convert's quantization flags: --quant (every type), --mmproj-quant, --imatrix, --plan, --keep-f16."""
from __future__ import annotations

import json
import re

from click.testing import CliRunner

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
