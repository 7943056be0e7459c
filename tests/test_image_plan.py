"""edge-convert --plan's image budgets are what the runtime's detail levels would pick on this device:
the fixed ladder, cut by the latency target with this device's measured rates (or the built-in guess)
and capped by free memory.

Expected values are computed here by hand: transformers' smart_resize for the grids, the
16*2^k / 24*2^k ladder, the encoder's FLOPs counted layer by layer from config.json, and the
projector compute buffer of 4 bytes x patches x 2 x (hidden + ff).
"""
from __future__ import annotations

import io
import json
import re
import time

import pytest
from click.testing import CliRunner
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from convert.shapes import model_shapes
from edge_app.cli import main
from edge_app.image_plan import PlanDevice, image_budget_plan
from edge_runtime import VisionChat
from tests.conftest import make_test_image

FACTOR = 32
LADDER = sorted({b * 2 ** k for b in (16, 24) for k in range(12)})
ROW = re.compile(r"^  (low|auto|high)\s+(\d+)\.\.(\d+)\s+(\d+)x(\d+) grid = (\d+) tokens, ([<\d.,]+) s\s+"
                 r"(\d+)x(\d+) grid = (\d+) tokens, ([<\d.,]+) s$", re.M)


def rows(output: str) -> dict[str, tuple]:
    found = {m[1]: m.groups()[1:] for m in ROW.finditer(output)}
    assert set(found) == {"low", "auto", "high"}, output
    return found


def plan_cli(model_dir, *args):
    res = CliRunner().invoke(main, [str(model_dir), "--plan", *map(str, args)])
    assert res.exit_code == 0, res.output
    return res.output


def hf_grid(w, h, lo, hi):
    rh, rw = hf_smart_resize(h, w, factor=FACTOR, min_pixels=lo * FACTOR ** 2, max_pixels=hi * FACTOR ** 2)
    return rw // FACTOR, rh // FACTOR


def vision_config(model_dir) -> dict:
    return json.loads((model_dir / "config.json").read_text())["vision_config"]


def encoder_flops(vc: dict, tokens: int) -> float:
    """2 x multiply-adds of one encode: patch embedding (3 channels x 2 frames x patch^2 -> hidden), per
    block qkv + output projection (4 d^2) and MLP (2 d ff) per patch plus attention scores and values
    (2 x patches^2 x d), then the merger and one per deepstack layer (4d -> 4d -> out) per token."""
    d, f, merge, patch = vc["hidden_size"], vc["intermediate_size"], vc["spatial_merge_size"], vc["patch_size"]
    p = tokens * merge * merge
    blocks = vc["depth"] * (2 * p * (4 * d * d + 2 * d * f) + 2 * 2 * p * p * d)
    embed = 2 * p * (3 * 2 * patch * patch) * d
    m = d * merge * merge
    mergers = (1 + len(vc["deepstack_visual_indexes"])) * 2 * tokens * (m * m + m * vc["out_hidden_size"])
    return float(blocks + embed + mergers)


# Without the latency cut (a huge --image-latency): low at most 256 tokens, high from the grounding
# minimum 1024 up to 4096, auto the largest ladder budget; each at most half the context. The tiny
# checkpoint's processor minimum is 8 tokens.
@pytest.mark.parametrize("n_ctx, budgets", [
    (4096, {"low": (8, 256), "auto": (8, 2048), "high": (1024, 2048)}),
    (1000, {"low": (8, 256), "auto": (8, 384), "high": (500, 500)}),
])
def test_plan_shows_image_budgets_per_detail(tiny_model_dir, n_ctx, budgets):
    got = rows(plan_cli(tiny_model_dir, "--ctx-size", n_ctx, "--image-latency", 1e9))
    for detail, (lo, hi) in budgets.items():
        row = got[detail]
        assert (int(row[0]), int(row[1])) == (lo, hi), detail
        for (w, h), cell in zip(((4032, 3024), (640, 480)), (row[2:6], row[6:10])):
            gw, gh = hf_grid(w, h, lo, hi)
            assert tuple(int(x) for x in cell[:3]) == (gw, gh, gw * gh), (detail, w, h)


def test_measured_rates_of_this_device_cut_auto(tiny_model_dir, tiny_f16_dir, tmp_path, monkeypatch):
    """The runtime's first encode of the f16 pair stores this device's rates; --plan on the checkpoint
    (text f16, projector f16: the same shape and type) finds them and applies the latency cut."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the user cache dir edge-chat would use
    cache = tmp_path / "qwen3-vl-edge"
    guessed = plan_cli(tiny_model_dir)
    assert "rates: the built-in guess for a" in guessed and "measured on" not in guessed

    buf = io.BytesIO()
    make_test_image(320, 256, seed=3).save(buf, format="PNG")
    with VisionChat.from_dir(tiny_f16_dir, n_ctx=1024, cost_cache_dir=cache) as chat:
        chat.encode_image(buf.getvalue())
    table = json.loads((cache / "device-cost.json").read_text())
    (key, entry), = table.items()
    assert entry["measured"]
    # A slow encoder (64 tokens: 7 s, so 96 tokens >= 10.5 s miss the 8 s target) and a free prefill:
    # auto keeps its fidelity floor of 256 tokens and says the target is missed.
    vc = vision_config(tiny_model_dir)
    rate = encoder_flops(vc, 64) / 7.0
    entry.update(encoder_flops_s=rate, prefill_flops_s=1e30, prefill_measured=True)
    (cache / "device-cost.json").write_text(json.dumps(table))

    measured = plan_cli(tiny_model_dir)
    assert f"rates: measured on {time.strftime('%Y-%m-%d', time.gmtime())}" in measured, measured
    assert key in measured
    auto, before = rows(measured)["auto"], rows(guessed)["auto"]
    assert (int(auto[0]), int(auto[1])) == (8, 256) and int(before[1]) > 256
    assert "raised to the floor 256" in measured and "over the 8.0 s target (the floor is kept)" in measured
    for (w, h), cell in zip(((4032, 3024), (640, 480)), (auto[2:6], auto[6:10])):
        # the floor holds in tokens: the smallest budget from 256 whose grid has 256 cells (18x13 = 234 has not)
        gw, gh = next(g for m in range(256, 512) if (g := hf_grid(w, h, 8, m))[0] * g[1] >= 256)
        assert tuple(int(x) for x in cell[:3]) == (gw, gh, gw * gh)
        assert float(cell[3]) == pytest.approx(encoder_flops(vc, gw * gh) / rate, rel=5e-3), (w, h)

    other = plan_cli(tiny_model_dir, "--mmproj-quant", "f32")
    assert "built-in guess" in other, "a projector of another type was not measured"


def test_free_memory_caps_auto(tiny_model_dir, tmp_path):
    vc = vision_config(tiny_model_dir)
    per_token = 4 * vc["spatial_merge_size"] ** 2 * 2 * (vc["hidden_size"] + vc["intermediate_size"])
    shapes = model_shapes(tiny_model_dir)

    def plan(free_bytes):
        return image_budget_plan(tiny_model_dir, shapes, 4096, latency_s=1e9, cache_dir=tmp_path,
                                 device=PlanDevice(threads=1, gpu=False, gpu_layers=0, free_bytes=free_bytes))

    assert rows(plan(None))["auto"][:2] == ("8", "2048")
    capped = plan(2 * 100 * per_token)  # half of it holds 100 tokens' buffers
    assert "memory: at most 100 tokens" in capped
    auto = rows(capped)["auto"]
    best = max(t for t in LADDER if t <= 100)
    assert (int(auto[0]), int(auto[1])) == (8, best) == (8, 96)
    assert "by free memory" in capped
    assert rows(capped)["high"][:2] == ("1024", "2048"), "the cap is auto's; high stays as asked"


def test_a_measured_entry_from_before_signatures_gets_one_on_its_next_load(tmp_path):
    """device-cost.json entries written before projector signatures existed are filled in (and kept),
    so that --plan can match them without a re-measurement."""
    from edge_runtime.vision.image_budget import cost_file, load_cost

    key = "text.gguf:1|mmproj.gguf:2|threads=2|gpu=0|layers=0"
    cost_file(tmp_path).write_text(json.dumps({key: {"encoder_flops_s": 1.5e11, "prefill_flops_s": 2e11,
                                                     "measured": True, "prefill_measured": True}}))
    cost = load_cost(tmp_path, key, False, "sig-of-this-projector")
    assert cost.encoder_flops_s == 1.5e11 and cost.projector == "sig-of-this-projector"
    assert json.loads(cost_file(tmp_path).read_text())[key]["projector"] == "sig-of-this-projector"
    unmeasured = "other|threads=2|gpu=0|layers=0"
    load_cost(tmp_path, unmeasured, False, "sig")
    assert unmeasured not in json.loads(cost_file(tmp_path).read_text())  # a guess is never stored
