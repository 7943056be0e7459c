"""The Qwen3-VL facts read the hub's real config (transformers 4.57 layout) as llama.cpp expects."""
from __future__ import annotations

import json
from pathlib import Path

from edge_models.qwen3vl.arch import text_hparams, vision_config
from edge_models.qwen3vl.synthetic import TEXT_2B, VISION_2B

SHARED_CONFIG = Path(__file__).parent / "data" / "qwen3-vl-2b-instruct.config.json"  # the hub's config.json


def test_real_2b_config_hparams():
    config = json.loads(SHARED_CONFIG.read_text())
    hp = text_hparams(config)
    assert (hp.n_layer, hp.n_embd, hp.n_ff, hp.n_head, hp.n_head_kv, hp.head_dim) == (28, 2048, 6144, 16, 8, 128)
    assert hp.rope_sections == (24, 20, 20, 0) and hp.rope_theta == 5e6 and hp.n_ctx == 262144
    assert hp.tied and hp.n_vocab == 151936 and hp.n_deepstack == 3
    vc = vision_config(config)
    assert vc.depth == 24 and vc.deepstack_visual_indexes == (5, 11, 17)


def test_synthetic_2b_shapes_are_the_real_ones():
    config = json.loads(SHARED_CONFIG.read_text())
    tc, vc = config["text_config"], config["vision_config"]
    assert (TEXT_2B.hidden, TEXT_2B.ff, TEXT_2B.layers, TEXT_2B.heads, TEXT_2B.kv_heads, TEXT_2B.head_dim) == (
        tc["hidden_size"], tc["intermediate_size"], tc["num_hidden_layers"], tc["num_attention_heads"],
        tc["num_key_value_heads"], tc["head_dim"])
    assert list(TEXT_2B.mrope_section) == tc["rope_scaling"]["mrope_section"] and TEXT_2B.vocab_size == tc["vocab_size"]
    assert (VISION_2B.depth, VISION_2B.hidden, VISION_2B.ff, VISION_2B.heads, VISION_2B.num_positions) == (
        vc["depth"], vc["hidden_size"], vc["intermediate_size"], vc["num_heads"], vc["num_position_embeddings"])
    assert list(VISION_2B.deepstack) == vc["deepstack_visual_indexes"]
