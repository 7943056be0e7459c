"""Per-image detail levels, the device-aware budget, the encoder cache on disk, attach/ask, encode_image.

Token counts are checked against transformers' smart_resize (an independent
implementation); equality of answers against a fresh conversation.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from edge_runtime import VisionChat
from edge_runtime.vision.disk_cache import SUFFIX
from edge_runtime.vision.image_budget import image_need, plan_for_context
from edge_runtime.vision.vision_spec import VisionSpec
from tests.conftest import make_test_image

GREEDY = {"temperature": 0.0, "max_tokens": 6}
FACTOR = 32
MIN_TOKENS = 8  # the tiny checkpoint's preprocessor (shortest_edge), written into its projector


def hf_tokens(size, min_tokens, max_tokens) -> int:
    h, w = hf_smart_resize(size[1], size[0], factor=FACTOR, min_pixels=min_tokens * FACTOR ** 2,
                           max_pixels=max_tokens * FACTOR ** 2)
    return (h // FACTOR) * (w // FACTOR)


def hf_floor_tokens(size, floor: int, budget: int | None = None) -> int:
    """auto's tokens for a large image at a `budget` (default: the floor): the smallest budget from it up
    whose smart_resize grid has at least `floor` cells (a 4:3 photo fits only 234 into 256)."""
    start = budget or floor
    return next(t for m in range(start, 4 * start) if (t := hf_tokens(size, MIN_TOKENS, m)) >= floor)


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo():
    return make_test_image(1000, 700, seed=11)


@pytest.fixture(scope="module")
def chat(tiny_f32_dir):
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=4096) as c:
        yield c


def test_detail_levels_choose_budgets_and_report_why(chat, photo):
    chat.reset()
    chat.ask("What is it?", images=[photo], detail="low", **GREEDY)
    low = chat.last_stats.image_details[0]
    assert low["detail"] == "low" and low["max_tokens"] == 256
    assert chat.last_stats.image_tokens == low["tokens"] == hf_tokens((1000, 700), MIN_TOKENS, 256)
    assert low["source_size"] == [1000, 700] and low["grid"][0] * low["grid"][1] == low["tokens"]
    assert "detail=low" in low["reason"]

    chat.reset()
    chat.ask("What is it?", images=[{"image": photo, "detail": "high"}], **GREEDY)
    high = chat.last_stats.image_details[0]
    assert high["detail"] == "high" and high["tokens"] >= 1024
    assert high["tokens"] == hf_tokens((1000, 700), 1024, 2048)  # capped at n_ctx / 2


def test_auto_fits_the_latency_target_and_never_upscales(tiny_f32_dir, photo):
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=4096, image_latency_s=1e-9) as fast:
        plan = fast.engine.plan_image("auto")
        # nothing fits the target: auto keeps its fidelity floor and the plan says it misses the target
        assert plan.max_tokens == plan.floor == 256 and plan.meets_target is False
        assert plan.predicted_s > plan.target_s == 1e-9 and "over the" in plan.reason
        fast.ask("Hi?", images=[photo], **GREEDY)
        assert fast.last_stats.image_tokens == hf_floor_tokens((1000, 700), 256) >= 256
        assert fast.last_stats.image_details[0]["meets_target"] is False
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=4096, image_latency_s=1e9) as slow:
        slow.ask("Hi?", images=[make_test_image(300, 200, seed=1)], **GREEDY)
        assert slow.last_stats.image_tokens == hf_tokens((300, 200), MIN_TOKENS, 16384) == 6 * 9
        assert slow.engine.cost.measured, "a real encode refines the device's cost model"


def test_explicit_token_bounds_win_over_detail(tiny_f32_dir, photo):
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=4096, image_max_tokens=40) as c:
        c.ask("Hi?", images=[photo], detail="high", **GREEDY)
        details = c.last_stats.image_details[0]
        assert c.last_stats.image_tokens == hf_tokens((1000, 700), 40, 40) <= 40
        assert "image_min_tokens/image_max_tokens" in details["reason"]


def test_detail_in_openai_messages_and_bad_values(chat, photo):

    uri = "data:image/png;base64," + __import__("base64").b64encode(png(photo)).decode()
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": uri, "detail": "low"}},
        {"type": "image_url", "image_url": {"url": uri, "detail": "high"}},
        {"type": "text", "text": "Compare."}]}]
    chat.generate(messages, **GREEDY)
    assert [d["detail"] for d in chat.last_stats.image_details] == ["low", "high"]
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri, "detail": "ultra"}}]}]
    with pytest.raises(ValueError, match=r"messages\[0\].content\[0\].detail must be one of low, auto, high"):
        chat.generate(bad)
    with pytest.raises(ValueError, match="detail must be one of"):
        chat.ask("x", images=[photo], detail="medium")


def test_disk_cache_serves_a_new_process_and_ignores_damaged_entries(tiny_f32_dir, tmp_path):
    image = png(make_test_image(320, 256, seed=12))
    cache = tmp_path / "enc"

    def run():
        with VisionChat.from_dir(tiny_f32_dir, n_ctx=1024, encoder_cache_dir=cache) as c:
            answer = c.ask("What is it?", images=[image], **GREEDY)
            return answer, c.last_stats

    first, s1 = run()
    assert s1.images_encoded == 1 and s1.disk_cache_hits == 0
    entries = list(cache.rglob("*" + SUFFIX))
    assert len(entries) == 1
    second, s2 = run()  # a fresh engine: its memory cache is empty, as in a new process
    assert s2.images_encoded == 0 and s2.disk_cache_hits == 1 and s2.image_encode_s == 0.0
    assert second == first

    data = bytearray(entries[0].read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the embeddings
    entries[0].write_bytes(bytes(data))
    third, s3 = run()
    assert s3.images_encoded == 1 and s3.disk_cache_hits == 0, "a damaged entry is never used"
    assert third == first
    _, s4 = run()
    assert s4.disk_cache_hits == 1, "the re-encode rewrote the entry"
    assert not list(cache.rglob("*.partial")), "no half-written files"


def test_disk_cache_stays_within_its_byte_bound(tiny_f32_dir, tmp_path):
    cache = tmp_path / "enc"
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=1024, encoder_cache_dir=cache, encoder_cache_mb=0) as c:
        one = c.encode_image(png(make_test_image(320, 256, seed=1)))
    bound_mb = one.embeddings.nbytes * 2.5 / (1 << 20)
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=1024, encoder_cache_dir=cache,
                             encoder_cache_disk_mb=bound_mb) as c:
        for seed in range(2, 6):
            c.encode_image(png(make_test_image(320, 256, seed=seed)))
    sizes = [p.stat().st_size for p in cache.rglob("*" + SUFFIX)]
    assert len(sizes) == 2 and sum(sizes) <= bound_mb * (1 << 20)


def test_attach_then_ask_evaluates_only_the_question(tiny_f32_dir):
    image = make_test_image(320, 256, seed=13)
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=1024, encoder_cache_mb=0) as fresh:
        expected = fresh.ask("What colour is the box?", images=[image], **GREEDY)
        n_prompt = fresh.last_stats.prompt_tokens
        expected_follow = fresh.ask("And the circle?", **GREEDY)
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=1024, encoder_cache_mb=0) as c:
        thread = c.attach([image])
        answer = c.ask("What colour is the box?", **GREEDY)
        assert not thread.is_alive()
        stats = c.last_stats
        assert answer == expected
        assert stats.prompt_tokens == n_prompt and stats.images_encoded == 0
        # the turn's opening, the image and <|vision_end|> were prefilled by attach
        assert stats.reused_tokens > stats.image_tokens > 0
        assert stats.evaluated_tokens == n_prompt - stats.reused_tokens
        follow = c.ask("And the circle?", **GREEDY)  # the attached image stays in the conversation
        assert c.last_stats.images_encoded == 0 and follow == expected_follow


def test_encode_image_returns_embeddings_grid_and_tokens(chat):
    image = make_test_image(500, 333, seed=14)
    a = chat.encode_image(image, detail="low")
    b = chat.encode_image(image, detail="low")  # from the cache this time
    assert a.n_tokens == hf_tokens((500, 333), MIN_TOKENS, 256) == a.grid[0] * a.grid[1]
    assert a.embeddings.shape == (a.n_tokens, chat.engine.n_embd_inp) and a.embeddings.dtype == np.float32
    assert np.array_equal(a.embeddings, b.embeddings)
    assert a.size == (a.grid[0] * FACTOR, a.grid[1] * FACTOR)


# The Qwen3-VL-2B projector's shapes (vision_config: hidden 1024, intermediate 4096, patch 16, merge 2).
SPEC_2B = VisionSpec(patch_size=16, merge_size=2, min_tokens=64, max_tokens=16384, hidden=1024, ff=4096,
                     depth=24, out_dim=2048, deepstack=3)


def test_projector_compute_estimate_matches_mtmd_report():
    # mtmd's log for the 2B projector at its 1472x1472 warm-up image (92 x 92 patches): 322.49 MiB.
    assert abs(SPEC_2B.compute_bytes(92 * 92 // 4) / (322.49 * 2**20) - 1) < 0.03


@pytest.mark.parametrize("free_mib, auto_max", [
    (None, 4096),      # no memory figure: the ladder's largest budget within half the 8192 context
    (1 << 20, 4096),   # 1 TiB free: memory is not the limit
    (200, 512),        # half of 200 MiB / (4 * 4 patches * 2 * 5120 B) = 640 tokens -> ladder 512
    (20, 64),          # 10 MiB / 160 KiB = 64 tokens, on the ladder
    (1, 3),            # 512 KiB / 160 KiB = 3 tokens, below the ladder: the processor's minimum 64 wins
])
def test_auto_respects_free_memory(free_mib, auto_max):
    free = None if free_mib is None else free_mib * 2**20
    plan = plan_for_context("auto", SPEC_2B, 8192, None, free_bytes=free)
    assert plan.max_tokens == max(auto_max, SPEC_2B.min_tokens)
    if free_mib is not None and auto_max < 4096:
        assert "free memory" in plan.reason
    # explicit requests and the other levels are not cut by memory
    assert plan_for_context("high", SPEC_2B, 8192, None, free_bytes=free).max_tokens == 4096
    assert plan_for_context("auto", SPEC_2B, 8192, None, explicit_max=2048, free_bytes=free).max_tokens == 2048


def test_images_of_one_message_share_the_latency_target_and_the_half_context():
    """Two images asked about together each get what one image gets at half the target and a
    quarter of the context: the answer's wait, not each image's, is what `image_latency_s` bounds."""
    from edge_runtime.vision.image_budget import DeviceCost

    spec = VisionSpec(16, 2, 8, 16384, hidden=1024, ff=4096, depth=24, out_dim=2048, deepstack=3)
    cost = DeviceCost(1.4e11, 2e11, measured=True, prefill_measured=True)
    text_flops = 3e9
    for latency in (2.0, 8.0, 30.0):
        one = plan_for_context("auto", spec, 4096, cost, text_flops, latency)
        two = plan_for_context("auto", spec, 4096, cost, text_flops, latency, share=2)
        alone_at_half = plan_for_context("auto", spec, 2048, cost, text_flops, latency / 2)
        assert two.max_tokens == alone_at_half.max_tokens <= one.max_tokens
        assert "shared by the 2 images of the message" in two.reason
    assert plan_for_context("auto", spec, 4096, cost, text_flops, 30.0, share=2).max_tokens < \
        plan_for_context("auto", spec, 4096, cost, text_flops, 30.0).max_tokens
    high = plan_for_context("high", spec, 4096, cost, text_flops, 8.0, share=4)
    alone = plan_for_context("high", spec, 4096, cost, text_flops, 8.0)
    assert (high.min_tokens, high.max_tokens) == (alone.min_tokens, alone.max_tokens)  # only auto is shared
    assert high.target_s == alone.target_s / 4  # but its wait is judged against its share of the target
    # a share never takes an image below the fidelity floor: four images at 2 s each keep 256 tokens,
    # and their plans say they miss the half-second each was given
    four = plan_for_context("auto", spec, 4096, cost, text_flops, 2.0, share=4)
    assert four.max_tokens == four.floor == 256 and four.meets_target is False and four.target_s == 0.5


def test_vision_chat_plans_the_images_of_one_ask_together(tiny_f32_dir, photo):
    # no latency cut (a tiny model on a busy machine may hold both at the floor): the half context is shared
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=4096, image_latency_s=1e9) as c:
        alone, together = c.engine.plan_image("auto"), c.engine.plan_image("auto", 2)
        c.ask("Compare them.", images=[photo, make_test_image(900, 600, seed=3)], **GREEDY)
        details = c.last_stats.image_details
        assert [d["max_tokens"] for d in details] == [together.max_tokens] * 2
        assert together.max_tokens < alone.max_tokens and "shared by the 2 images" in details[0]["reason"]
        c.reset()
        msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                + __import__("base64").b64encode(png(photo)).decode()}}, {"type": "text", "text": "What is it?"}]}]
        c.generate(msg, **GREEDY)
        assert c.last_stats.image_details[0]["max_tokens"] == c.engine.plan_image("auto").max_tokens


def test_the_first_image_is_planned_from_this_device_and_the_rates_persist(tiny_f32_dir, photo, test_cache_home):
    """A fresh process measures the device at load (a small calibration image through the ask path) and
    keeps the rates in the user cache dir by default; the first real ask replaces the calibration, and
    a later process plans its first photo from the stored rates exactly as the first one planned its third."""
    from edge_runtime.vision.image_budget import GUESS_CPU, DeviceCost

    stored = test_cache_home / "qwen3-vl-edge" / "device-cost.json"
    assert not stored.exists(), "each test starts with an empty user cache dir"
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=4096) as first:
        cost = first.engine.cost
        assert cost.source == "calibration" and cost.prefill_measured and cost.prefill_calibrated
        assert (cost.encoder_flops_s, cost.prefill_flops_s) != GUESS_CPU
        (entry,) = json.loads(stored.read_text()).values()  # written at load, before any image
        assert DeviceCost(**entry) == cost
        planned = first.plan_image(photo)
        assert planned.plan.max_tokens >= 256
        assert planned.tokens == hf_floor_tokens((1000, 700), 256, planned.plan.max_tokens)
        first.ask("What is it?", images=[photo], **GREEDY)
        assert first.last_stats.image_tokens == planned.tokens
        assert first.engine.cost.source == "measured" and not first.engine.cost.prefill_calibrated
        measured = first.engine.cost
        for _ in range(2):
            first.reset()
            first.ask("What is it?", images=[photo], **GREEDY)
        third = first.last_stats.image_details[0]
        assert first.engine.cost == measured, "measured once, then kept: a busy moment moves no budget"
    (entry,) = json.loads(stored.read_text()).values()
    assert DeviceCost(**entry) == measured
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=4096) as later:  # a new process on this device
        assert later.engine.cost == measured, "read back, not calibrated again"
        later.ask("What is it?", images=[photo], **GREEDY)
        assert later.last_stats.image_details[0]["max_tokens"] == third["max_tokens"]
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=4096, cost_cache_dir=None) as memory_only:
        assert memory_only.engine.cost.source == "calibration", "None keeps the rates in memory: calibrated"


@pytest.mark.parametrize("prompt, schema, need", [
    ("What is in this photo?", None, ""),
    ("Read the text on the sign.", None, "text"),
    ("Transcribe the receipt", None, "text"),
    ("What does the label say?", None, "text"),
    ("Locate every cup and output their bbox coordinates in JSON.", None, "grounding"),
    ("List the objects.", {"type": "array", "items": {"type": "object", "properties": {
        "bbox_2d": {"type": "array"}, "label": {"type": "string"}}}}, "grounding"),
    ("List the objects.", json.dumps({"properties": {"point_2d": {}}}), "grounding"),
    ("List the objects.", {"properties": {"name": {"type": "string"}}}, ""),
])
def test_image_need_from_the_question_and_the_schema(prompt, schema, need):
    assert image_need(prompt, schema) == need


def test_auto_keeps_a_fidelity_floor_that_rises_for_text_and_boxes(tiny_f32_dir, photo):
    """auto never goes below 256 tokens, 1024 when the question reads text or the answer is boxes
    (the page's Locate mode sends a json_schema with bbox_2d); `low` is the caller's to ask for."""
    boxes = {"type": "array", "items": {"type": "object", "properties": {"bbox_2d": {"type": "array"},
                                                                         "label": {"type": "string"}}}}
    big = make_test_image(2000, 1500, seed=4)
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=4096, image_latency_s=1e-9) as c:  # no budget fits the target
        look = c.plan_image(big)
        read = c.plan_image(big, prompt="Read the sign.")
        grounding = c.plan_image(big, prompt="List them.", json_schema=boxes)
        low = c.plan_image(big, "low")
        assert (look.plan.floor, read.plan.floor, grounding.plan.floor) == (256, 1024, 1024)
        assert look.tokens == hf_floor_tokens((2000, 1500), 256) == 266  # 19 x 14: 18 x 13 = 234 is short
        assert read.tokens == grounding.tokens == hf_floor_tokens((2000, 1500), 1024)
        assert low.tokens == hf_tokens((2000, 1500), MIN_TOKENS, 256) and low.plan.floor == 0
        assert not (look.meets_target or read.meets_target) and read.predicted_s > look.predicted_s > 0
        assert "floor 1024 for text" in read.plan.reason and "over the" in read.plan.reason
        c.ask("Read the sign.", images=[big], **GREEDY)
        assert c.last_stats.image_tokens == read.tokens
        details = c.last_stats.image_details[0]
        assert details["need"] == "text" and details["floor"] == 1024 and details["meets_target"] is False
        c.reset()
        c.ask("List them.", images=[big], json_schema=boxes, max_tokens=4)
        assert c.last_stats.image_details[0]["need"] == "grounding"
        assert c.last_stats.image_tokens == grounding.tokens
        c.reset()
        c.ask("What is it?", images=[big, photo], **GREEDY)  # two images share the target, each keeps the floor
        assert [d["max_tokens"] for d in c.last_stats.image_details] == [256, 256]
        assert [d["tokens"] for d in c.last_stats.image_details] == [266, hf_floor_tokens((1000, 700), 256)]
