"""Settings tuned on this device (`edge-bench --tune`) are the load's defaults: stored with every measured
value and the choice, used where the caller set nothing, overridden by any explicit setting, and a
damaged or foreign file is ignored with a warning. Real llama.cpp on the tiny GGUF fixtures; each test
has its own user cache dir (conftest), so the tuned file one test writes is never another's."""
from __future__ import annotations

import json
import logging

import pytest

from edge_bench.tune import TuneSetup, run_tune, tune_markdown
from edge_llama import physical_cores
from edge_runtime import VisionChat
from edge_runtime.core.tuned import TUNED_FILE, choose, save_tuned, tuned_key
from edge_runtime.vision.disk_cache import user_cache_dir


def pair(out_dir):
    m = json.loads((out_dir / "manifest.json").read_text())
    return out_dir / m["text"]["path"], out_dir / m["mmproj"]["path"]


TUNED = {"threads": 1, "n_ubatch": 32, "repack": False, "kv_cache_type_k": "bf16", "kv_cache_type_v": "bf16",
         "flash_attn": True, "mmproj_flash_attn": False}


def store(text, mmproj, settings, workload="image"):
    return save_tuned(user_cache_dir(), tuned_key(text, mmproj),
                      {"workloads": {workload: {"settings": settings, "why": {}}}, "sweep": []})


def test_choice_follows_the_workloads_measure():
    """A fixed sweep table: the image workload takes each setting's lowest TTFT, the chat workload its
    highest decode (at long context where measured), and a gain under 3% keeps the default."""
    points = [
        {"vary": "", "settings": {}, "ttft_s": 10.0, "decode_tok_s": 8.0, "decode_long_tok_s": 6.0},
        {"vary": "repack", "changes": {"repack": False}, "settings": {"repack": False}, "ttft_s": 8.0,
         "decode_tok_s": 7.0},
        {"vary": "flash_attn", "changes": {"flash_attn": False}, "settings": {"flash_attn": False}, "ttft_s": 10.1,
         "decode_tok_s": 7.9, "decode_long_tok_s": 7.0},
        {"vary": "threads", "changes": {"threads": 1}, "settings": {"threads": 1}, "ttft_s": 9.9,
         "decode_tok_s": 8.1},
    ]
    image, why = choose(points, "image")
    assert image == {"repack": False}
    assert "10.00" in why["repack"] and "8.00" in why["repack"]
    assert why["threads"].startswith("default kept")  # 9.9 vs 10.0: inside the noise margin
    chat, why = choose(points, "chat")
    assert chat == {"flash_attn": False}  # 7.0 vs 6.0 tok/s at long context, though 7.9 vs 8.0 at short
    assert "long-context" in why["flash_attn"]


def test_winners_that_cannot_combine_keep_the_larger_gain_and_encoder_settings_stay_out_of_chat():
    """llama.cpp refuses a quantized V cache without flash attention: when both won apart, the smaller
    gain goes back to its default; the projector's flash attention never decides text decode."""
    points = [
        {"vary": "", "settings": {}, "ttft_s": 10.0, "decode_tok_s": 20.0, "decode_long_tok_s": 10.0},
        {"vary": "flash_attn", "changes": {"flash_attn": False}, "settings": {"flash_attn": False}, "ttft_s": 11.0,
         "decode_tok_s": 21.0, "decode_long_tok_s": 14.0},
        {"vary": "mmproj_flash_attn", "changes": {"mmproj_flash_attn": False}, "settings": {"mmproj_flash_attn": False},
         "ttft_s": 10.5, "decode_tok_s": 25.0},
        {"vary": "kv", "changes": {"kv_cache_type_k": "q8_0", "kv_cache_type_v": "q8_0"}, "settings": {"kv": "q8_0"},
         "ttft_s": 10.2, "decode_tok_s": 22.0},
    ]
    chat, why = choose(points, "chat")
    assert chat == {"flash_attn": False}  # 1.4x at long context beats KV q8_0's 1.1x
    assert why["kv"].startswith("default kept: needs the other")
    assert why["mmproj_flash_attn"].startswith("default kept")


@pytest.fixture(scope="module")
def tuned_run(tiny_f32_dir, tmp_path_factory):
    text, mmproj = pair(tiny_f32_dir)
    directory = tmp_path_factory.mktemp("tuned")
    return text, mmproj, directory, run_tune(TuneSetup(text, mmproj, tuned_dir=directory), log=lambda s: None,
                                             progress=False)


def test_tune_stores_every_measured_value_and_the_choice(tuned_run):
    text, mmproj, directory, result = tuned_run
    stored = json.loads((directory / TUNED_FILE).read_text())["entries"][tuned_key(text, mmproj)]
    sweep = [p for p in result["sweep"] if not p["error"]]
    assert [p["label"] for p in sweep][:2] == ["defaults", "repack off"]
    assert {p["vary"] for p in sweep} >= {"repack", "flash_attn", "mmproj_flash_attn", "n_ubatch"}
    kv = next(p for p in result["sweep"] if p["vary"] == "kv")  # the tiny model's 16-wide heads refuse q8_0
    assert kv["error"] and "q8_0" in kv["error"] and kv not in stored["sweep"]
    assert stored["sweep"] == sweep  # the why: each measured value, as measured
    for p in sweep:
        assert p["image_tokens"] == 300 and p["ttft_s"] > 0 and p["decode_tok_s"] > 0
        assert len(p["samples"]) == 2  # the sweep forward, then backward: each point keeps its best
        assert p["ttft_s"] == min(t for t, _ in p["samples"]) and p["decode_tok_s"] == max(d for _, d in p["samples"])
    # the image workload's choice is, per setting, the lowest TTFT (or the default within 3%)
    base = sweep[0]
    for name in {p["vary"] for p in sweep[1:]}:
        tried = [p for p in sweep[1:] if p["vary"] == name]
        best = min(tried, key=lambda p: p["ttft_s"])
        chosen = stored["workloads"]["image"]["settings"]
        if best["ttft_s"] * 1.03 < base["ttft_s"]:
            assert all(chosen[k] == v for k, v in best["changes"].items())
        elif all(p["ttft_s"] * 1.02 >= base["ttft_s"] for p in tried):
            assert not set(best["changes"]) & set(chosen)
    assert set(stored["workloads"]) == {"image", "chat"}
    # the check loads took their settings from the file, nothing else
    assert result["after"]["image"]["tuned"] == stored["workloads"]["image"]["settings"]
    table = tune_markdown(result, "test machine")
    assert "| defaults | 300 |" in table and "Defaults after tuning vs the sweep's best" in table


def test_load_uses_the_tuned_settings_unless_set_explicitly(tiny_f32_dir, caplog):
    text, mmproj = pair(tiny_f32_dir)
    path = store(text, mmproj, TUNED)
    with caplog.at_level(logging.INFO, logger="edge_runtime"):
        with VisionChat(text, mmproj, n_ctx=256) as chat:
            eng = chat.engine
            assert eng.tuned == TUNED and eng.tuned_file == path
            assert (eng.threads, eng.n_ubatch) == (1, 32)
            assert (eng.options.kv_cache_type_k, eng.options.repack, eng.options.mmproj_flash_attn) == \
                ("bf16", False, False)
    assert any("tuned:" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    with VisionChat(text, mmproj, n_ctx=256, threads=2, kv_cache_type="f16", repack=True,
                    flash_attn=False) as chat:
        eng = chat.engine
        assert eng.threads == 2 and eng.options.kv_cache_type_v == "f16" and eng.options.repack is True
        assert eng.tuned == {"n_ubatch": 32, "mmproj_flash_attn": False}
    with VisionChat(text, mmproj, n_ctx=256, tuned_dir=None) as chat:  # tuning switched off
        assert chat.engine.tuned == {} and chat.engine.options.kv_cache_type_k == "f16"


def test_workload_picks_its_own_entry(tiny_f32_dir):
    text, mmproj = pair(tiny_f32_dir)
    store(text, mmproj, {"threads": 1}, workload="chat")
    with VisionChat(text, mmproj, n_ctx=256) as chat:  # a projector: the image workload, not tuned
        assert chat.engine.tuned == {} and chat.engine.threads == physical_cores()
    with VisionChat(text, mmproj, n_ctx=256, workload="chat") as chat:
        assert chat.engine.tuned == {"threads": 1}


def test_no_tuned_file_changes_nothing(tiny_f32_dir):
    text, mmproj = pair(tiny_f32_dir)
    with VisionChat(text, mmproj, n_ctx=256) as chat:
        eng = chat.engine
        assert eng.tuned == {} and eng.tuned_file is None
        assert (eng.options.kv_cache_type_k, eng.options.kv_cache_type_v, eng.options.repack) == ("f16", "f16", True)
        assert eng.threads == physical_cores()


@pytest.mark.parametrize("content, says", [
    ("{not json", "is not JSON"),
    (json.dumps({"entries": {}}), "is not a tuned-settings file"),
    ("BAD_SETTING", "n_ctx=8"),
    ("BAD_VALUE", "threads=-1"),
])
def test_damaged_or_foreign_file_is_ignored_with_a_warning(tiny_f32_dir, caplog, content, says):
    text, mmproj = pair(tiny_f32_dir)
    path = store(text, mmproj, {"threads": 1})
    if content.startswith("BAD_"):
        table = json.loads(path.read_text())
        setting = {"BAD_SETTING": {"n_ctx": 8}, "BAD_VALUE": {"threads": -1}}[content]
        table["entries"][tuned_key(text, mmproj)]["workloads"]["image"]["settings"] = setting
        content = json.dumps(table)
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="edge_runtime"):
        with VisionChat(text, mmproj, n_ctx=256) as chat:
            assert chat.engine.tuned == {} and chat.engine.threads == physical_cores()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "tuned" in r.getMessage()]
    assert warned and str(path) in warned[0] and says in warned[0]
