"""Quantizing Qwen3-VL MoE: llama-quantize's own mix (experts, router, attention) and our prediction of it.

The quantizer is llama.cpp's (llama_model_quantize), so the files must be byte-identical to what the
llama-quantize tool writes; quant.rules must predict every tensor's type, including llama.cpp's MoE rules
(the layer read from the name, an 8-expert model's attn_v/attn_k at Q8_0, the router never quantized).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from convert.shapes import model_shapes
from quant import estimate as E
from quant.text import TextQuantOptions, quantize_text
from test_quant_support import assert_types_match_llama_cpp, pair_of
from test_quant_text import llama_quantize, sha
from edge_models.qwen3vl.synthetic import TextShape, VisionShape
from edge_models.qwen3vlmoe.synthetic import MoeSyntheticSpec

# every test reads a checkpoint built with torch or transformers' meta-device shapes
pytestmark = pytest.mark.torch

DATA = Path(__file__).parent / "data"
# 256-wide rows (k-quant blocks fit), 8 experts (llama.cpp's 8-expert rules) or 6, top-2, 4 layers.
WIDE_MOE = MoeSyntheticSpec(
    text=TextShape(hidden=256, ff=512, layers=4, heads=4, kv_heads=1, head_dim=64, mrope_section=(8, 12, 12)),
    vision=VisionShape(depth=2, hidden=64, ff=128, heads=4, deepstack=(0,)),
    experts=8, experts_used=2, moe_ff=256, seed=21,
)
TYPES_HERE = ["q4_k_m", "mxfp4_moe", "q8_0", "q6_k", "q5_k_m", "q4_k_s", "q3_k_m", "q3_k_l", "q2_k", "iq4_xs", "q4_0"]


@pytest.fixture(scope="module", params=[8, 6], ids=["8-experts", "6-experts"])
def wide_moe(request, artifacts):
    spec = replace(WIDE_MOE, experts=request.param)
    return artifacts.model(spec), pair_of(artifacts.converted(spec, "f16"))[0]


def types_as_llama_quantize_writes(f16: Path, tmp_path: Path, quant: str) -> dict[str, str]:
    """Our `quant` file's tensor types, once it is byte-identical to llama-quantize's."""
    ours = quantize_text(f16, tmp_path / "ours.gguf", TextQuantOptions(quant, progress=False))
    llama_quantize(f16, tmp_path / "ref.gguf", quant)
    assert sha(tmp_path / "ours.gguf") == sha(tmp_path / "ref.gguf")
    return ours.types()


def test_q4_k_m_is_byte_identical_to_llama_quantize(wide_moe, tmp_path):
    types = types_as_llama_quantize_writes(wide_moe[1], tmp_path, "q4_k_m")
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"  # the router is never quantized
    assert {types[f"blk.{i}.ffn_down_exps.weight"] for i in range(4)} == {"Q6_K", "Q4_K"}  # use_more_bits by layer
    assert types["blk.1.ffn_up_exps.weight"] == "Q4_K"


def test_mxfp4_moe_is_byte_identical_to_llama_quantize(wide_moe, tmp_path):
    """llama.cpp's MOSTLY_MXFP4_MOE: the stacked expert tensors in MXFP4, every other weight (output too) Q8_0."""
    types = types_as_llama_quantize_writes(wide_moe[1], tmp_path, "mxfp4_moe")
    assert {types[f"blk.{i}.ffn_{p}_exps.weight"] for i in range(4) for p in ("gate", "up", "down")} == {"MXFP4"}
    assert types["output.weight"] == types["blk.0.attn_q.weight"] == types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"


def test_predicted_types_match_llama_quantize(wide_moe, tmp_path):
    model_dir, f16 = wide_moe
    shapes = model_shapes(model_dir)
    for q in TYPES_HERE:
        r = quantize_text(f16, tmp_path / f"{q}.gguf", TextQuantOptions(q, progress=False))
        est = E.estimate(shapes, q)
        assert est.text.types() == r.types(), q
        assert est.text.tensor_bytes == sum(x.n_bytes for x in r.tensors), q
        (tmp_path / f"{q}.gguf").unlink()


@pytest.mark.parametrize("name", ["qwen3-vl-30b-a3b-instruct", "qwen3-vl-235b-a22b-instruct"])
def test_real_moe_shapes_match_llama_cpp_dry_run(name, tmp_path):
    """The published configs' shapes (128 experts, 48 / 94 layers): llama.cpp's types for every type, both ways."""
    cfg = json.loads((DATA / f"{name}.config.json").read_text())
    assert_types_match_llama_cpp(cfg, model_shapes(cfg), tmp_path)


def test_imatrix_counts_each_expert_as_llama_imatrix_does(artifacts, tmp_path):
    """One row of sums and one count per expert; the counts are the tokens transformers' own router sends there."""
    import torch
    from transformers import AutoTokenizer

    from edge_models.qwen3vl import calibration as family
    from edge_models.qwen3vlmoe.reference import Reference
    from quant.calibration import builtin_calibration
    from quant.imatrix import load, save
    from quant.imatrix_compute import ImatrixOptions, compute_imatrix

    model_dir, f16 = artifacts.model(WIDE_MOE), pair_of(artifacts.converted(WIDE_MOE, "f16"))[0]
    samples = builtin_calibration((128, 96))[:2]
    im = compute_imatrix(model_dir, samples, ImatrixOptions(progress=False))
    n_layer, n_expert, top_k = 4, WIDE_MOE.experts, WIDE_MOE.experts_used

    ref = Reference.load(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    expected = np.zeros((n_layer, n_expert), dtype=np.int64)
    n_tokens = 0
    for s in samples:
        kwargs = family.model_inputs(s.prompt, s.image, tokenizer, family.image_processor(model_dir), ref.config)
        with torch.no_grad():
            out = ref.model(**kwargs, output_router_logits=True)
        n_tokens += int(kwargs["input_ids"].shape[-1])
        for layer, logits in enumerate(out.router_logits):
            chosen = torch.topk(logits.float(), top_k, dim=-1).indices.flatten().numpy()
            expected[layer] += np.bincount(chosen, minlength=n_expert)
    for layer in range(n_layer):
        for kind in ("gate", "up", "down"):
            e = im.entries[f"blk.{layer}.ffn_{kind}_exps.weight"]
            assert e.sums.shape == (n_expert, 256) and (e.sums >= 0).all()
            assert list(e.counts) == list(expected[layer]), (layer, kind)
        router = im.entries[f"blk.{layer}.ffn_gate_inp.weight"]  # llama-imatrix records the router's input too
        assert list(router.counts) == [n_tokens]
        assert np.allclose(router.sums, im.entries[f"blk.{layer}.ffn_gate_exps.weight"].sums.sum(0) / top_k, rtol=1e-4)
    assert expected.sum() == n_layer * n_tokens * top_k

    path = save(im, tmp_path / "imatrix.gguf")  # llama.cpp's layout: in_sum2 ne [cols, experts], counts [1, experts]
    back = load(path)
    assert list(back.entries["blk.2.ffn_down_exps.weight"].counts) == list(expected[2])
    # llama_model_quantize takes it (it wants ne0 * experts values per expert tensor) and it changes the result
    a = quantize_text(f16, tmp_path / "a.gguf", TextQuantOptions("iq4_xs", progress=False))
    b = quantize_text(f16, tmp_path / "b.gguf", TextQuantOptions("iq4_xs", imatrix=path, progress=False))
    assert b.imatrix_entries == n_layer * 8 + 1  # attention 4, experts 3, router, per layer; the output
    assert sha(tmp_path / "a.gguf") != sha(tmp_path / "b.gguf")
    assert a.types() == b.types()
    quantize_text(f16, tmp_path / "c.gguf", TextQuantOptions("iq2_xxs", imatrix=path, progress=False))
