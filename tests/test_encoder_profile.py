"""The encoder profile: ggml's scheduler times each node of a real encode on the tiny model; stages
come from the projector's weight names; FLOPs are checked against the GGUF's own tensor shapes."""
from __future__ import annotations

import re

import gguf
import pytest

from edge_common.manifest import resolve_model_paths
from edge_llama.graph_watch import NodeTime
from edge_runtime import VisionChat
from edge_runtime.bench.encoder_profile import node_stages, op_rows, profile_encode

STAGES = ("patch embedding", "attention", "mlp", "deepstack", "merger")


def _node(op: str, weight: str | None = None, seconds: float = 1.0) -> NodeTime:
    return NodeTime(index=0, op=op, name="", weight=weight, weight_type="f16" if weight else None,
                    flops=0.0, seconds=seconds)


def test_nodes_without_weights_join_the_next_stage_and_trailing_ones_the_last():
    nodes = [_node("IM2COL"), _node("MUL_MAT", "v.patch_embd.weight"), _node("NORM"),
             _node("MUL", "v.blk.0.ln1.weight"), _node("FLASH_ATTN_EXT"), _node("MUL_MAT", "v.blk.0.attn_out.weight"),
             _node("GELU"), _node("MUL_MAT", "v.blk.0.ffn_down.weight"), _node("MUL_MAT", "mm.0.weight"),
             _node("MUL_MAT", "v.deepstack.1.fc2.weight"), _node("CONCAT"), _node("MUL_MAT", "v.unknown.weight")]
    assert node_stages(nodes) == ["patch embedding", "patch embedding", "attention", "attention", "attention",
                                  "attention", "mlp", "mlp", "merger", "deepstack", "other", "other"]
    assert node_stages(nodes[:2] + [_node("CONCAT")]) == ["patch embedding"] * 3


def _expected_matmul_flops(mmproj, patches: int, tokens: int) -> dict[str, float]:
    """2 x K x N x rows for every weight matrix, from the GGUF's shapes: blocks and the patch
    embedding see every 16x16 patch, the mergers (deepstack, final) every merged token."""
    out = dict.fromkeys(STAGES, 0.0)
    for t in gguf.GGUFReader(mmproj).tensors:
        if not t.name.endswith((".weight", ".weight.1")) or len(t.shape) < 2 or "position_embd" in t.name:
            continue
        if re.search(r"\.(ln1|ln2|norm|post_ln)\.", t.name):
            continue
        k = int(t.shape[:-1].prod()) if t.name.startswith("v.patch_embd") else int(t.shape[0])
        n = int(t.shape[-1]) if t.name.startswith("v.patch_embd") else int(t.shape[1])
        if t.name.startswith("v.patch_embd"):
            out["patch embedding"] += 2.0 * k * n * patches
        elif re.match(r"v\.blk\.\d+\.attn_", t.name):
            out["attention"] += 2.0 * k * n * patches
        elif re.match(r"v\.blk\.\d+\.ffn_", t.name):
            out["mlp"] += 2.0 * k * n * patches
        elif t.name.startswith("v.deepstack."):
            out["deepstack"] += 2.0 * k * n * tokens
        elif t.name.startswith("mm."):
            out["merger"] += 2.0 * k * n * tokens
    return out


def test_profile_times_every_stage_of_a_real_encode(tiny_f32_dir, test_image):
    _, mmproj = resolve_model_paths(tiny_f32_dir)
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=1024, encoder_cache_mb=0) as chat:
        prof = profile_encode(chat, test_image, keep_embeddings=True)
        reference = chat.encode_image(test_image).embeddings
        grid = chat.encode_image(test_image).grid
    assert prof.tokens == grid[0] * grid[1] and prof.embeddings.shape == reference.shape
    assert abs(prof.embeddings - reference).max() == 0.0  # profiling changes nothing in the output
    rows = {(r.stage, r.op): r for r in prof.rows}
    assert {s for s, _ in rows} == set(STAGES)
    assert rows[("attention", "FLASH_ATTN_EXT")].nodes == chat.engine.vision.depth
    assert sum(r.seconds for r in prof.rows) <= prof.profiled_s
    patches = prof.tokens * 4
    measured = {s: sum(r.flops for r in prof.rows if r.stage == s and r.op.startswith("MUL_MAT f")) for s in STAGES}
    assert measured == pytest.approx(_expected_matmul_flops(mmproj, patches, prof.tokens), rel=1e-9)


def test_timer_records_only_inside_its_block(tiny_f32_dir, test_image):
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=1024, encoder_cache_mb=0) as chat:
        timer = chat.engine.encoder_timer
        with timer.timing() as nodes:
            chat.encode_image(test_image)
        recorded = len(nodes)
        chat.encode_image(test_image)
    assert recorded > 0 and len(nodes) == recorded
    flash = [n for n in nodes if n.op == "FLASH_ATTN_EXT"]
    assert flash and all(n.flops > 0 and n.weight is None for n in flash)
    assert op_rows(nodes)[0].stage == "patch embedding"
