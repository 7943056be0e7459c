"""The encoder profile: ggml's scheduler times each node of a real encode on the tiny model; stages
come from the projector's weight names; FLOPs are checked against the GGUF's own tensor shapes."""
from __future__ import annotations

import re

import gguf
import pytest

from edge_common.manifest import resolve_model_paths
from edge_llama.graph_watch import NodeTime
from edge_runtime import VisionChat
from edge_bench.encoder_profile import node_stages, op_rows, profile_encode

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
        timer = chat.engine.encoder_watch
        with timer.timing() as nodes:
            chat.encode_image(test_image)
        recorded = len(nodes)
        chat.encode_image(test_image)
    assert recorded > 0 and len(nodes) == recorded
    flash = [n for n in nodes if n.op == "FLASH_ATTN_EXT"]
    assert flash and all(n.flops > 0 and n.weight is None for n in flash)
    assert op_rows(nodes)[0].stage == "patch embedding"


class _Calls:
    """A stop predicate that turns true on its n-th call and counts its calls."""

    def __init__(self, true_from: int | None):
        self.true_from, self.calls = true_from, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.true_from is not None and self.calls >= self.true_from


def test_a_stopped_encode_stops_at_the_first_piece_boundary(tiny_f32_dir, test_image):
    from edge_llama.graph_watch import STOP_CHECK_EVERY

    with VisionChat.from_dir(tiny_f32_dir, n_ctx=1024, encoder_cache_mb=0) as chat:
        watch = chat.engine.encoder_watch
        full = chat.encode_image(test_image).embeddings
        with watch.timing() as nodes:
            chat.encode_image(test_image)
        never = _Calls(None)
        with watch.stopping(never) as state:
            pieces = chat.encode_image(test_image).embeddings
        assert not state.stopped and never.calls == len(nodes) // STOP_CHECK_EVERY > 1
        assert abs(pieces - full).max() == 0.0  # computed in pieces: the same numbers
        at_once = _Calls(1)
        with watch.stopping(at_once) as state:
            chat.encode_image(test_image)
        assert state.stopped and at_once.calls == 1  # nothing after the first boundary ran
        with watch.timing() as partial, watch.stopping(_Calls(5)) as state:
            chat.encode_image(test_image)
        assert state.stopped and len(partial) == 5 < len(nodes)


class _CancelledDuringEncode:
    """A job whose client hangs up once the encode has started (its second look at `cancelled`)."""

    number = 1

    def __init__(self):
        self.looks = 0

    @property
    def cancelled(self) -> bool:
        self.looks += 1
        return self.looks > 1


def test_the_server_drops_an_image_whose_request_went_away_mid_encode(tiny_f32_dir, test_image):
    import threading

    from edge_runtime.server.prefill import PrefillWork, VisionWorker

    with VisionChat.from_dir(tiny_f32_dir, n_ctx=1024) as chat:
        engine = chat.engine
        loaded = chat.load_image(test_image)
        woken = threading.Event()
        worker = VisionWorker(engine, woken.set)
        try:
            with engine.tokenize(engine.marker, [loaded]) as prompt:
                chunk = next(c for c in prompt.chunks if c.kind == "image")
                job = _CancelledDuringEncode()
                work = PrefillWork(prompt, seq_id=0, keep=0, job=job)
                worker.encode(work, [chunk])
                for _ in range(600):
                    with work.lock:
                        if not work.encoding:
                            break
                    woken.wait(0.1)
                    woken.clear()
                assert not work.encoding and work.failed is None
                assert work.embeddings == {} and worker.stopped_encodes == 1 and job.looks == 2
                assert engine.encoder_cache.get(chunk.digest) is None  # half-computed output never cached
        finally:
            worker.stop()
