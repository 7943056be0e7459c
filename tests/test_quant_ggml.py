"""The ctypes binding to libggml-base's quantizer."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as G

from quant import ggml
from quant.errors import QuantError


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((70, 512)).astype(np.float32)


def test_library_is_found_in_the_installed_package():
    path = ggml.library_path()
    assert "llama_cpp" in str(path) and path.name.startswith("libggml-base")


def test_sizes_match_gguf_py_tables():
    for t in (G.Q8_0, G.Q4_K, G.Q6_K, G.Q5_0, G.IQ4_NL, G.IQ2_XXS, G.F16, G.BF16):
        block, size = gguf.GGML_QUANT_SIZES[t]
        assert ggml.block_size(t) == block and ggml.type_size(t) == size
        assert ggml.row_size(t, 1024) == 1024 // block * size
    assert ggml.type_name(G.Q4_K) == "q4_K"


def test_q8_0_matches_gguf_py_reference_quantizer(rows):
    ours = ggml.quantize(G.Q8_0, rows)
    ref = gguf.quants.quantize(rows, G.Q8_0)
    assert ours.tobytes() == ref.tobytes()


@pytest.mark.parametrize("t,tol", [(G.Q8_0, 0.01), (G.Q6_K, 0.03), (G.Q4_K, 0.12), (G.Q4_0, 0.15)])
def test_round_trip_error_is_small(rows, t, tol):
    q = ggml.quantize(t, rows)
    back = gguf.quants.dequantize(q.reshape(rows.shape[0], -1), t)
    rel = np.abs(back - rows).mean() / np.abs(rows).mean()
    assert rel < tol


def test_threads_give_identical_bytes(rows, monkeypatch):
    monkeypatch.setattr(ggml, "ROWS_PER_TASK_ELEMENTS", 512 * 8)  # many chunks
    assert ggml.quantize(G.Q4_K, rows, nthread=3).tobytes() == ggml.quantize(G.Q4_K, rows, nthread=1).tobytes()


def test_imatrix_changes_the_result(rows):
    imat = np.linspace(0.01, 10.0, rows.shape[1]).astype(np.float32)
    assert ggml.quantize(G.Q4_K, rows, imat).tobytes() != ggml.quantize(G.Q4_K, rows).tobytes()


def test_types_that_need_an_imatrix_are_refused_without_one(rows):
    assert ggml.requires_imatrix(G.IQ2_XXS) and not ggml.requires_imatrix(G.Q4_K)
    with pytest.raises(QuantError, match="importance matrix"):
        ggml.quantize(G.IQ2_XXS, rows)  # ggml itself would abort the process


def test_bad_row_length_and_imatrix_size(rows):
    with pytest.raises(QuantError, match="block size 256"):
        ggml.quantize(G.Q4_K, rows[:, :96])
    with pytest.raises(QuantError, match="imatrix has 3 values"):
        ggml.quantize(G.Q8_0, rows, np.ones(3, np.float32))
