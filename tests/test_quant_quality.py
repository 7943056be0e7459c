"""Quality numbers: KL divergence and top-1 agreement through llama.cpp, image-embedding cosine through mtmd."""
from __future__ import annotations

import numpy as np
import pytest

from quant.errors import QuantError
from quant.mmproj import MmprojQuantOptions, quantize_mmproj
from quant.quality import ModelPair, QualityOptions, evaluate, format_table, kl_divergence
from quant.text import TextQuantOptions, quantize_text
from test_quant_support import WIDE_SPEC, pair_of, reference_projector


@pytest.fixture(scope="module")
def pairs(artifacts, tmp_path_factory):
    d = tmp_path_factory.mktemp("quality")
    text, mm = pair_of(artifacts.converted(WIDE_SPEC, "f16"))
    ref = ModelPair(text, reference_projector(mm, d / "mmproj-ref.gguf"))
    out = {"f16": ref}
    for tq, mq in (("q8_0", "q8_0"), ("q3_k_s", "q4_0")):
        t = quantize_text(text, d / f"t-{tq}.gguf", TextQuantOptions(tq, progress=False)).path
        m = quantize_mmproj(mm, d / f"m-{mq}.gguf", MmprojQuantOptions(mq, progress=False)).path
        out[tq] = ModelPair(t, m)
    return out


@pytest.fixture(scope="module")
def options(test_image):
    return QualityOptions(prompts=("The quick brown fox jumps over", "Question: what is two plus two?\\nAnswer:"),
                          image_prompts=("Describe this image.",), images=(test_image,), continuation=8, threads=1)


@pytest.fixture(scope="module")
def reports(pairs, options):
    return {q: evaluate(pairs["f16"], pairs[q], options) for q in ("f16", "q8_0", "q3_k_s")}


def test_identical_pair_has_zero_divergence(reports):
    r = reports["f16"]
    assert r.overall.kl_mean < 1e-6 and r.overall.top1_agreement == 1.0 and r.overall.logit_rel_rmse < 1e-6
    assert r.image_cosine_min > 0.999999


def test_q8_0_is_close_and_lower_bits_diverge_more(reports):
    q8, q3 = reports["q8_0"], reports["q3_k_s"]
    assert q8.text_only.positions > 10 and q8.with_images.positions > 10
    assert q8.overall.kl_mean < 0.01 and q8.overall.top1_agreement >= 0.9
    assert q8.image_cosine_min >= 0.999
    assert q3.overall.kl_mean > q8.overall.kl_mean
    assert q3.image_cosine_mean < q8.image_cosine_mean
    assert q8.overall.kl_p99 >= q8.overall.kl_mean and q8.overall.kl_max >= q8.overall.kl_p99
    assert 0 < q8.overall.logit_rel_rmse < q3.overall.logit_rel_rmse < 1  # meaningful where KL saturates


def test_report_dict_and_table(reports):
    r = reports["q8_0"]
    d = r.to_dict()
    assert set(d) >= {"overall", "text_only", "with_images", "image_cosine_mean", "image_cosine_min"}
    assert d["overall"]["positions"] == r.overall.positions
    table = format_table(r)
    for word in ("KL mean", "KL p99", "top-1", "with images", "text only", "cosine"):
        assert word in table


def test_kl_divergence_function():
    a = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    assert np.allclose(kl_divergence(a, a), 0.0)
    p = np.exp(a[0]) / np.exp(a[0]).sum()
    assert np.isclose(kl_divergence(a[:1], a[1:])[0], float((p * np.log(p * 3)).sum()))


def test_text_only_pairs_and_bad_projector(pairs, options, tmp_path):
    r = evaluate((pairs["f16"].text, None), (pairs["q8_0"].text, None), options)
    assert r.with_images is None and r.image_cosine_mean is None and r.text_only.positions > 10
    with pytest.raises(QuantError, match="manifest.json"):
        evaluate(tmp_path, tmp_path, options)
