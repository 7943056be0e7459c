"""The converted GGUF pair, run by llama.cpp, must compute what transformers computes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edge_models import family_for_hf
from edge_models.qwen3vl.synthetic import SyntheticSpec, TextShape, VisionShape
from edge_models.qwen3vlmoe.synthetic import MoeSyntheticSpec

from edge_llama import FLASH_ATTN_OFF, Context, ContextOptions, Model, Projector, kv_type

# every test loads its checkpoint into transformers, the reference
pytestmark = pytest.mark.torch

# f32 KV cache and no flash attention (which rounds Q to f16): the exact path, so
# that what is measured is the conversion, not llama.cpp's speed-for-precision trades.
EXACT = dict(type_k=int(kv_type("f32").ggml_type), type_v=int(kv_type("f32").ggml_type),
             flash_attn=FLASH_ATTN_OFF)

PROMPT = "<|im_start|>user\nDescribe the red box on the left, please! How many circles: 3?<|im_end|>\n<|im_start|>assistant\n"
BEFORE, AFTER = "<|im_start|>user\n", "What is in this picture?<|im_end|>\n<|im_start|>assistant\n"

VARIANTS = {
    "hf5-bf16-tied-4L": SyntheticSpec(),
    "hf4-f32-untied-5L-sharded": SyntheticSpec(layout="hf4", dtype="f32", tied=False, text_layers=5, shards=2, seed=1),
    "hf5-f16-tied-6L-vision4": SyntheticSpec(dtype="f16", text_layers=6, vision_depth=4, seed=2),
    # Other widths, head counts and rope sections, as 4B/8B differ from 2B only in numbers.
    "hf4-bf16-wide": SyntheticSpec(
        layout="hf4", seed=4,
        text=TextShape(hidden=128, ff=320, layers=5, heads=8, kv_heads=2, head_dim=32, mrope_section=(4, 6, 6)),
        vision=VisionShape(depth=4, hidden=96, ff=192, heads=6, deepstack=(1, 2, 3)),
    ),
    # MoE (qwen3vlmoe): 6 experts, top-2 routing, deepstack; transformers 5's expert layout with
    # hidden == 2 * expert ff (the shape that fits both layouts: config.json's marker decides) ...
    "moe-hf5-bf16-ambiguous": MoeSyntheticSpec(moe_ff=32, seed=5),
    # ... and the hub's layout (transformers 4.57), 8 experts, top-3, untied, 5 layers.
    "moe-hf4-f32-8x3": MoeSyntheticSpec(layout="hf4", dtype="f32", experts=8, experts_used=3, text_layers=5, seed=6),
}
TOL = {"f32": 1e-2, "f16": 5e-2}


def manifest_paths(out_dir):
    m = json.loads((out_dir / "manifest.json").read_text())
    return out_dir / m["text"]["path"], out_dir / m["mmproj"]["path"]


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, artifacts):
    spec = VARIANTS[request.param]
    model_dir = artifacts.model(spec)
    config = json.loads((model_dir / "config.json").read_text())
    return spec, family_for_hf(config).module("reference").Reference.load(model_dir)


@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_text_logits_match_transformers(variant, artifacts, quant):
    spec, ref = variant
    text_path, _ = manifest_paths(artifacts.converted(spec, quant))
    model = Model(text_path)
    ctx = Context(model, ContextOptions(n_ctx=256, **EXACT))
    try:
        ids = model.tokenize(PROMPT)
        assert ids == ref.tokenize(PROMPT), "llama.cpp's qwen2 pre-tokenizer must split like the HF tokenizer"
        ctx.decode(ids, all_logits=True)
        ours = ctx.all_logits(len(ids))[:, : ref.config["text_config"]["vocab_size"]]
    finally:
        ctx.close(), model.close()
    theirs = ref.text_logits(ids)
    assert np.abs(theirs).max() > 1.0, "fixture logits should have a useful magnitude"
    assert np.abs(ours - theirs).max() < TOL[quant]
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


EMBD_TOL = {"f32": 5e-3, "f16": 2e-2}


@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_image_embeddings_and_image_prompt_match_transformers(variant, artifacts, test_image, quant):
    spec, ref = variant
    text_path, mmproj_path = manifest_paths(artifacts.converted(spec, quant))
    model = Model(text_path)
    proj = Projector(mmproj_path, model)
    ctx = Context(model, ContextOptions(n_ctx=512, **EXACT))
    try:
        chunks = proj.tokenize(BEFORE + proj.marker + AFTER, [np.asarray(test_image)])
        image_chunk = chunks[1]
        ours = proj.encode(image_chunk)
        n_past = proj.eval_chunks(ctx, chunks)
        last = ctx.logits()[: ref.config["text_config"]["vocab_size"]]
        chunks.close()
    finally:
        ctx.close(), proj.close(), model.close()
    theirs = ref.image_embeddings(test_image)
    assert ours.shape == theirs.shape == (48, model.n_embd * (1 + len(spec.vision_shape().deepstack)))
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < EMBD_TOL[quant]
    assert n_past > 0
    theirs_last = ref.image_prompt_logits(BEFORE, test_image, AFTER)
    assert np.abs(last - theirs_last).max() < TOL[quant]
    assert last.argmax() == theirs_last.argmax()
