"""The Qwen3-VL family's published configs (tests/data, see its README): read, planned from config.json
alone, and, for the dense sizes, converted from synthetic checkpoints scaled down from them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from convert.shapes import model_shapes
from edge_models import lookup
from edge_models.qwen3vl.config import MoeTextConfig, TextConfig, VisionConfig
from edge_models.qwen3vl.synthetic import SyntheticSpec, TextShape, VisionShape
from quant import estimate as E
from quant.report import read_tensors
from quant.text import TextQuantOptions, quantize_text
from test_quant_support import pair_of

DATA = Path(__file__).parent / "data"
# size: (arch, layers, hidden, ff, heads, kv heads, tied, vision depth, vision hidden, deepstack,
#        experts, experts used, expert ff)
PUBLISHED = {
    "2b": ("qwen3vl", 28, 2048, 6144, 16, 8, True, 24, 1024, (5, 11, 17), 0, 0, 0),
    "4b": ("qwen3vl", 36, 2560, 9728, 32, 8, True, 24, 1024, (5, 11, 17), 0, 0, 0),
    "8b": ("qwen3vl", 36, 4096, 12288, 32, 8, False, 27, 1152, (8, 16, 24), 0, 0, 0),
    "32b": ("qwen3vl", 64, 5120, 25600, 64, 8, False, 27, 1152, (8, 16, 24), 0, 0, 0),
    "30b-a3b": ("qwen3vlmoe", 48, 2048, 6144, 32, 4, False, 27, 1152, (8, 16, 24), 128, 8, 768),
    "235b-a22b": ("qwen3vlmoe", 94, 4096, 12288, 64, 4, False, 27, 1152, (8, 16, 24), 128, 8, 1536),
}
# Q4_K_M files published on the hub (Qwen/Qwen3-VL-*-Instruct-GGUF, unsloth), GB: the plan must land near them.
PUBLISHED_Q4_K_M_GB = {"4b": 2.50, "8b": 5.03, "32b": 19.8, "30b-a3b": 18.6}


def config(size: str) -> dict:
    return json.loads((DATA / f"qwen3-vl-{size}-instruct.config.json").read_text())


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_published_configs_are_read_as_llama_cpp_needs(size):
    cfg = config(size)
    arch, layers, hidden, ff, heads, kv, tied, depth, v_hidden, deepstack, experts, used, expert_ff = PUBLISHED[size]
    assert lookup(cfg).name == arch
    hp = (MoeTextConfig if experts else TextConfig).from_dict(cfg)
    assert (hp.n_layer, hp.n_embd, hp.n_ff, hp.n_head, hp.n_head_kv) == (layers, hidden, ff, heads, kv)
    assert hp.head_dim == 128
    assert hp.rope_sections == (24, 20, 20, 0) and hp.rope_theta == 5e6 and hp.tied == tied and hp.n_vocab == 151936
    if experts:
        assert (hp.n_expert, hp.n_expert_used, hp.n_ff_exp) == (experts, used, expert_ff)
    vc = VisionConfig.from_dict(cfg)
    assert (vc.depth, vc.hidden_size, vc.deepstack_visual_indexes, vc.out_hidden_size) == (depth, v_hidden, deepstack,
                                                                                          hidden)


@pytest.mark.torch
@pytest.mark.parametrize("size", list(PUBLISHED_Q4_K_M_GB))
def test_plan_from_config_alone_lands_on_the_published_files(size):
    e = E.estimate(model_shapes(config(size)), "q4_k_m")
    assert abs(e.text.bytes / 1e9 / PUBLISHED_Q4_K_M_GB[size] - 1) < 0.03, e.text.bytes
    if PUBLISHED[size][10]:  # MoE: the experts are most of it, and the table says so
        assert 0.8 < e.experts_bytes / e.text.tensor_bytes < 0.95
        assert "experts MB" in E.format_plan([e])


@pytest.mark.torch
def test_30b_a3b_memory_matches_llama_cpp():
    """llama.cpp on the 30B-A3B shapes (a sparse f16 file, mmap, n_ctx 4096, n_ubatch 512, f16 KV) reports
    "KV buffer size = 384.00 MiB" and "compute buffer size = 316.75 MiB"."""
    e = E.estimate(model_shapes(config("30b-a3b")), "q4_k_m", n_ctx=4096)
    assert e.kv_bytes == 384 * 2**20
    assert abs(e.compute_bytes / (316.75 * 2**20) - 1) < 0.03


def scaled_down(size: str) -> SyntheticSpec:
    """The published shape with widths / 16, heads / 4 (GQA ratio, q width != hidden and tying kept), 4 layers,
    a 4-block vision tower with 3 deepstack mergers."""
    _, _, hidden, ff, heads, kv, tied, _, v_hidden, _, _, _, _ = PUBLISHED[size]
    return SyntheticSpec(
        tied=tied, seed=40 + len(size),
        text=TextShape(hidden=hidden // 16, ff=ff // 16, layers=4, heads=heads // 4, kv_heads=kv // 4, head_dim=32,
                       mrope_section=(6, 5, 5)),
        vision=VisionShape(depth=4, hidden=v_hidden // 8, ff=v_hidden // 2, heads=4, deepstack=(1, 2, 3)),
    )


@pytest.mark.torch
@pytest.mark.parametrize("size", ["4b", "8b", "32b"])
def test_scaled_down_dense_sizes_convert_as_planned(artifacts, tmp_path, size):
    spec = scaled_down(size)
    model_dir = artifacts.model(spec)
    text, mmproj = pair_of(artifacts.converted(spec, "f16"))
    shapes = model_shapes(model_dir)
    e = E.estimate(shapes, "f16")
    assert (e.text.bytes, e.mmproj.bytes) == (text.stat().st_size, mmproj.stat().st_size)
    q = quantize_text(text, tmp_path / "q.gguf", TextQuantOptions("q4_k_m", progress=False))
    assert E.estimate(shapes, "q4_k_m").text.types() == q.types()
    assert {t.name for t in read_tensors(text)} >= {"blk.3.attn_q.weight", "token_embd.weight"}
    assert ("output.weight" in {t.name for t in read_tensors(text)}) != spec.tied
