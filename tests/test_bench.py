"""edge-bench machinery on the tiny synthetic model: protocol, schema, every figure present and positive.

Speeds are not tested (a shared CI machine says nothing about them); what is
tested is that each party measures what the report needs, that the numbers
are sane in kind (positive, per-process peaks) and that the outputs parse.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_bench.cli import main as cli_main
from edge_bench.convert_bench import bench_convert
from edge_bench.machine import backend_name, cpu_model_from_cpuinfo
from edge_bench.models import BenchSetupError, prepare_dir
from edge_bench.options import (CHAT_HANDLER, RAW, RUNTIME, TRANSFORMERS, BenchOptions, Config, Measure,
                                        Resolution)
from edge_bench.report import RATIOS, fmt_ratio, fmt_summary, to_markdown
from edge_bench.roofline import kv_bytes_read, weight_bytes_read
from edge_bench.summary import ratio, summarize
from edge_bench.workers import WorkerSpec, parse_output

RES = Resolution(128, 96)
MEASURE = Measure(n_ctx=512, n_batch=128, threads=2, prompt_lengths=(16, 48), decode_tokens=4, warmup=1, repeats=2)
PER_ROUND = {  # figures each party must report, as samples of every measured round
    RUNTIME: ["load_s", "image_encode_s", "ttft_first_s", "ttft_followup_s", "decode_tok_s", "decode_mean_tok_s",
              "prefill_tok_s@16", "prefill_tok_s@48", "prefill_image_prompt_tok_s"],
    RAW: ["load_s", "image_encode_s", "ttft_first_s", "ttft_followup_s", "decode_tok_s", "decode_mean_tok_s",
          "prefill_tok_s@16", "prefill_tok_s@48"],
    CHAT_HANDLER: ["load_s", "ttft_first_s", "ttft_followup_s", "decode_tok_s", "decode_mean_tok_s"],
    TRANSFORMERS: ["load_s", "ttft_first_s", "decode_tok_s", "decode_mean_tok_s"],
}
SUMMARY_KEYS = {"median", "min", "max", "n", "spread"}


@pytest.fixture(scope="module")
def bench_models(tiny_f16_dir, tmp_path_factory):
    """The tiny pair as converted, with a q8_0 projector derived by quant.mmproj."""
    return prepare_dir(tiny_f16_dir, ("f16",), "q8_0", cache_dir=tmp_path_factory.mktemp("bench-cache"),
                       progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def report(bench_models):
    from edge_bench.api import run_bench

    options = BenchOptions(quants=("f16",), mmproj_quant="q8_0", kv_types=("f16",), resolutions=(RES,),
                           measure=MEASURE, baselines=(RAW, CHAT_HANDLER, TRANSFORMERS), memory_breakdown=True,
                           accuracy=True, worker_timeout_s=600)
    return run_bench(bench_models, options, progress=False)


@pytest.fixture(scope="module")
def report_json(report, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench-json") / "bench.json"
    report.write_json(path)
    return json.loads(path.read_text())


# ---------------------------------------------------------------- a whole run


def test_json_has_machine_options_bandwidth_and_one_config(report_json):
    assert report_json["schema"] == 1
    machine = report_json["machine"]
    assert machine["cpu_model"] and machine["physical_cores"] >= 1 and machine["ram_bytes"] > 0
    assert machine["backend"] and "llama_cpp_system_info" in machine
    assert report_json["options"]["measure"]["repeats"] == MEASURE.repeats
    assert report_json["bandwidth"]["bytes_per_s"] > 0
    assert [c["label"] for c in report_json["configs"]] == [Config("f16", "q8_0", "f16", RES).label]


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.torch) if k == TRANSFORMERS else k
                                  for k in PER_ROUND])  # transformers' party needs torch
def test_every_party_reports_every_figure_positive(report_json, kind):
    party = report_json["configs"][0]["parties"][kind]
    assert party["error"] is None
    rounds = 1 if kind == TRANSFORMERS else MEASURE.repeats
    for name in PER_ROUND[kind]:
        fig = party["figures"][name]
        assert set(fig) == SUMMARY_KEYS, name
        assert fig["n"] == rounds and len(party["samples"][name]) == rounds, name
        assert 0 < fig["min"] <= fig["median"] <= fig["max"] and math.isfinite(fig["max"]), name
        assert fig["spread"] == pytest.approx((fig["max"] - fig["min"]) / 2), name  # "± half their range"
    assert party["peak_rss_bytes"] > 0


def test_runtime_values_and_file_sizes(report_json):
    cfg = report_json["configs"][0]
    v = cfg["parties"][RUNTIME]["values"]
    assert v["image_tokens"] > 0 and v["prompt_tokens"] > v["image_tokens"]
    assert v["decode_tokens"] >= 2 and v["kv_cache_bytes"] > 0
    assert v["followup_reused_tokens"] > v["image_tokens"]  # the follow-up kept the image in the KV cache
    assert v["prefill_tokens@48"] > v["prefill_tokens@16"] > 0
    assert cfg["text_bytes"] > 0 and cfg["mmproj_bytes"] > 0
    assert cfg["parties"][RAW]["values"]["image_tokens"] == v["image_tokens"]  # same image, same tokens
    # the image's native budget: the tiny processor's tokens at its max_pixels (smart_resize by hand:
    # RES is a multiple of 32 on both sides and far under max_pixels, so it is kept as it is)
    assert v["native_image_tokens"] == (RES.width // 32) * (RES.height // 32)


def test_ttft_ratios_are_taken_at_equal_image_tokens_only():
    """A faster first answer about a smaller image is no comparison: the ratio is refused and says why."""
    from edge_bench.report import ConfigReport, PartyFigures, compute_ratios, ratio_cell
    from edge_bench.summary import summarize_all

    def party(kind: str, ttft: float, tokens: int) -> PartyFigures:
        return PartyFigures(kind, summarize_all({"ttft_first_s": [ttft], "decode_tok_s": [10.0]}),
                            {"image_tokens": tokens}, 1, [], None, {})

    cfg = Config("q4_k_m", "q8_0", "f16", RES)
    unequal = ConfigReport(cfg, {RUNTIME: party(RUNTIME, 1.0, 117), RAW: party(RAW, 2.0, 300)}, 1, 1)
    unequal.ratios = compute_ratios(unequal.parties)
    assert unequal.ratios["ttft_first_vs_raw"] is None and unequal.ratios["decode_vs_raw"] == 1.0
    assert ratio_cell(unequal, "ttft_first_vs_raw") == "not compared: 117 vs 300 image tokens"
    equal = ConfigReport(cfg, {RUNTIME: party(RUNTIME, 1.0, 300), RAW: party(RAW, 2.0, 300)}, 1, 1)
    equal.ratios = compute_ratios(equal.parties)
    assert ratio_cell(equal, "ttft_first_vs_raw") == "0.50 (both 300 image tokens)"


def test_worker_peaks_are_per_process(report_json):
    """The parent held a 512 MiB bandwidth buffer before starting workers; no llama.cpp worker may inherit it."""
    for kind in (RUNTIME, RAW, CHAT_HANDLER):
        assert report_json["configs"][0]["parties"][kind]["peak_rss_bytes"] < 450e6, kind


@pytest.mark.torch
def test_ratios_roofline_and_memory_breakdown(report_json):
    cfg = report_json["configs"][0]
    assert set(cfg["ratios"]) == set(RATIOS)
    assert all(r is not None and r > 0 for r in cfg["ratios"].values())
    roof = cfg["roofline"]
    assert roof["weight_bytes"] > 0 and roof["kv_bytes"] > 0 and roof["fraction"] > 0 and roof["bound_tok_s"] > 0
    assert len(cfg["memory"]) >= 3
    for row in cfg["memory"]:
        assert row["error"] is None and row["peak_rss_bytes"] > 0 and row["decode_tok_s"] > 0
        assert row["image_prompt_s"] > 0
        assert list(row["stages"]) == ["model", "context", "projector", "image", "decode"]
        assert all(b > 0 for b in row["stages"].values())
        assert row["variant"]["name"]


def test_accuracy_against_the_float_files(report_json):
    """f16 text + q8_0 projector against the f16 pair: text probes agree, the projector moves a little."""
    acc = report_json["configs"][0]["accuracy"]
    assert acc["error"] is None and acc["positions"] > 0
    assert 0 <= acc["kl_mean"] <= acc["kl_p99"] <= acc["kl_max"] < 0.1
    assert 0.9 <= acc["top1_agreement"] <= 1
    assert 0 <= acc["logit_rel_rmse"] < 0.1
    assert 0.99 < acc["image_cosine_min"] <= acc["image_cosine_mean"] < 1.0


def test_accuracy_needs_the_float_reference(bench_models):
    from dataclasses import replace

    from edge_bench.runner import plan

    options = BenchOptions(quants=("f16",), mmproj_quant="q8_0", resolutions=(RES,), measure=MEASURE, accuracy=True)
    assert plan(options, bench_models)[-1].variant["text"].endswith(".gguf")
    with pytest.raises(ValueError, match="float files"):
        plan(options, replace(bench_models, reference=None))


@pytest.mark.torch
def test_markdown_has_every_section(report):
    md = to_markdown(report)
    for heading in ("### VisionChat", "### Baselines", "### Ratios", "### Roofline", "### Where the memory goes",
                    "### Accuracy", "Memory read bandwidth"):
        assert heading in md
    assert "VisionChat decode / raw llama.cpp decode (>= 0.97)" in md
    assert "failed" not in md


def test_plot_writes_a_png(report, tmp_path):
    from edge_bench.plot import plot  # matplotlib comes with the bench extra

    out = plot(report, tmp_path / "bench.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- CLI


def test_cli_table_and_json(tiny_f16_dir, tmp_path):
    out = tmp_path / "b.json"
    args = [str(tiny_f16_dir), "--cache-dir", str(tmp_path), "--mmproj-quant", "q8_0", "--cache-type-k", "f16",
            "--resolution", "96x96", "--prompt-lengths", "16", "--decode-tokens", "4", "--repeats", "1",
            "--warmup", "0", "--ctx-size", "512", "--baselines", "none", "--no-bandwidth", "--json", str(out), "-q"]
    result = CliRunner().invoke(cli_main, args)
    assert result.exit_code == 0, result.output
    assert "| f16 | q8_0 | f16 | 96x96 |" in result.output
    data = json.loads(out.read_text())
    assert data["configs"][0]["parties"][RUNTIME]["figures"]["decode_tok_s"]["median"] > 0
    assert data["bandwidth"] is None


def test_cli_names_a_worker_signal_and_fails_when_every_party_died(tiny_f16_dir, tmp_path, monkeypatch):
    """Workers that die by SIGILL (as on the AMX Xeon of issue 10): cause and setting named, exit code 1."""
    from edge_bench.workers import SELF_SIGNAL_ENV

    monkeypatch.setenv(SELF_SIGNAL_ENV, "SIGILL")
    args = [str(tiny_f16_dir), "--cache-dir", str(tmp_path), "--mmproj-quant", "q8_0", "--cache-type-k", "f16",
            "--resolution", "96x96", "--prompt-lengths", "16", "--decode-tokens", "4", "--repeats", "1",
            "--warmup", "0", "--ctx-size", "512", "--baselines", "raw", "--no-bandwidth", "-q"]
    result = CliRunner().invoke(cli_main, args)
    assert result.exit_code == 1, result.output
    assert "killed by SIGILL (signal 4)" in result.output and "EDGE_AMX=off" in result.output
    assert "every party failed for f16+q8_0 KV f16 96x96" in result.output


def test_cli_extra_bufts_modes_are_measured_side_by_side(tiny_f16_dir, tmp_path):
    out = tmp_path / "b.json"
    args = [str(tiny_f16_dir), "--cache-dir", str(tmp_path), "--mmproj-quant", "q8_0", "--cache-type-k", "f16",
            "--resolution", "96x96", "--prompt-lengths", "16", "--decode-tokens", "4", "--repeats", "1",
            "--warmup", "0", "--ctx-size", "512", "--baselines", "none", "--no-bandwidth", "--json", str(out), "-q",
            "--extra-bufts", "repack,none"]
    result = CliRunner().invoke(cli_main, args)
    assert result.exit_code == 0, result.output
    labels = [c["label"] for c in json.loads(out.read_text())["configs"]]
    assert labels == ["f16+q8_0 KV f16 96x96 bufts repack", "f16+q8_0 KV f16 96x96 bufts none"]
    assert "| f16 (bufts repack) | q8_0 | f16 | 96x96 |" in result.output
    bad = CliRunner().invoke(cli_main, args[:-1] + ["turbo"])
    assert bad.exit_code == 2 and "unknown mode(s) turbo" in bad.output


@pytest.mark.parametrize("args, message", [
    ([], "nothing to bench"),
    (["--synthetic", "tiny", "--resolution", "640by480"], "WIDTHxHEIGHT"),
    (["--synthetic", "tiny", "--quant", "q9_z"], "unknown quantization type"),
    (["--synthetic", "tiny", "--cache-type-k", "q3_k"], "unknown KV cache type"),
    (["--synthetic", "tiny", "--baselines", "ollama"], "unknown baseline"),
])
def test_cli_errors_are_clear(args, message):
    result = CliRunner().invoke(cli_main, args)
    assert result.exit_code == 2
    assert message in result.output


def test_missing_manifest_is_a_setup_error(tmp_path):
    with pytest.raises(BenchSetupError, match="manifest.json not found"):
        prepare_dir(tmp_path, ("f16",), "f16", cache_dir=tmp_path)


# ---------------------------------------------------------------- converter benchmark, peak wrapper


@pytest.mark.parametrize("target", ["f16", "q4_k_m"])
def test_convert_bench(tiny_model_dir, tmp_path, target):
    run = bench_convert(tiny_model_dir, target, tmp_path)
    assert run.error is None, run.error
    assert run.wall_s > 0 and run.peak_rss_bytes > 0 and run.output_bytes > 0
    assert not list(tmp_path.iterdir())  # scratch output removed


def test_peak_wrapper_reports_the_module_peak(tmp_path):
    peak_file = tmp_path / "peak.json"
    code = subprocess.run([sys.executable, "-m", "edge_bench.peak", str(peak_file), "json.tool", "--help"],
                          capture_output=True, check=False).returncode
    data = json.loads(peak_file.read_text())
    assert code == data["exit_code"] == 0 and data["peak_rss_bytes"] > 0


# ---------------------------------------------------------------- pure pieces


def test_summary_and_ratio():
    s = summarize([3.0, 1.0, 2.0])
    assert (s.median, s.min, s.max, s.n, s.spread) == (2.0, 1.0, 3.0, 3, 1.0)
    assert ratio(s, summarize([4.0])) == 0.5
    assert ratio(s, None) is None and ratio(None, s) is None and ratio(s, 0.0) is None
    with pytest.raises(ValueError):
        summarize([])


def test_decode_rates_ignore_a_stall():
    from edge_bench.summary import decode_rates

    median, mean = decode_rates([0.0, 0.1, 0.2, 0.3, 1.3])  # one gap stretched by another process
    assert median == pytest.approx(10.0) and mean == pytest.approx(4 / 1.3)
    assert decode_rates([0.0, 0.1]) is None


def test_formatting():
    assert fmt_summary(summarize([10.0, 12.0])) == "11.0 ±1.00"
    assert fmt_summary(None) == "–"
    assert fmt_ratio(0.98, ">=", 0.97).endswith("✅") and fmt_ratio(0.5, ">", 4.0).endswith("❌")
    assert fmt_ratio(None, "<", 0.2) == "–"


def test_resolution_parsing():
    assert Resolution.parse(" 640x480 ") == Resolution(640, 480)
    assert str(Resolution.parse("1280X960")) == "1280x960"
    for bad in ("640", "x480", "16x16"):
        with pytest.raises(ValueError):
            Resolution.parse(bad)


def test_measure_validation():
    with pytest.raises(ValueError, match="does not fit"):
        Measure(n_ctx=512, prompt_lengths=(512,))
    with pytest.raises(ValueError, match="decode_tokens"):
        Measure(decode_tokens=2)


def test_weights_read_per_token():
    assert weight_bytes_read({"token_embd.weight": 100, "blk.0.w": 10}) == 110  # tied: embedding is the output
    assert weight_bytes_read({"token_embd.weight": 100, "output.weight": 100, "blk.0.w": 10}) == 110
    assert kv_bytes_read(4096 * 10, 4096, prompt_tokens=100, decode_tokens=20) == 10 * 110


def test_machine_probes():
    assert cpu_model_from_cpuinfo("processor\t: 0\nmodel name\t: AMD EPYC 7B13\n") == "AMD EPYC 7B13"
    assert cpu_model_from_cpuinfo("Hardware\t: BCM2835\nModel\t: Raspberry Pi 5 Model B\n") == "Raspberry Pi 5 Model B"
    assert backend_name("CPU : AVX2 = 1 | CUDA : ARCHS = 890", True) == "CUDA"
    assert backend_name("CPU : AVX2 = 1", False) == "CPU"


def test_worker_output_parsing():
    spec = WorkerSpec(RAW, Config("f16", "f16", "f16", RES), MEASURE, "t.gguf", "m.gguf")
    assert WorkerSpec.from_json(spec.to_json()) == spec
    crashed = parse_output(spec, -6, "", "ggml.c:5176: GGML_ASSERT(a->type == GGML_TYPE_F32) failed\n", 1.0)
    assert not crashed.ok and "signal 6" in crashed.error and "GGML_ASSERT" in crashed.error
    garbage = parse_output(spec, 0, "not json", "", 1.0)
    assert not garbage.ok and "unreadable" in garbage.error
    with pytest.raises(ValueError, match="unknown worker kind"):
        WorkerSpec("ollama", spec.config, MEASURE)


def _result(kind: str, cfg: Config, decode: list[float], peak: int) -> "WorkerResult":
    from edge_bench.workers import WorkerResult

    return WorkerResult(kind, cfg, {"decode_tok_s": decode}, {"image_tokens": 4}, ["n"], peak, 1.0)


def test_passes_alternate_parties_and_pool_samples(bench_models):
    from edge_bench.runner import group, plan

    options = BenchOptions(quants=("f16",), mmproj_quant="q8_0", kv_types=("f16",), resolutions=(RES,),
                           measure=MEASURE, baselines=(RAW,), passes=2)
    assert [s.kind for s in plan(options, bench_models)] == [RUNTIME, RAW, RAW, RUNTIME]
    cfg = next(options.configs())
    runs = group(options, [_result(RUNTIME, cfg, [1.0], 10), _result(RAW, cfg, [2.0], 30),
                           _result(RUNTIME, cfg, [3.0], 20), _result(RAW, cfg, [4.0], 5)])[0].runs
    assert runs[RUNTIME].samples["decode_tok_s"] == [1.0, 3.0] and runs[RUNTIME].peak_rss_bytes == 20
    assert runs[RAW].samples["decode_tok_s"] == [2.0, 4.0] and runs[RAW].peak_rss_bytes == 30
    assert runs[RAW].notes == ["n"]


def test_json_reads_back_into_the_same_report(report, report_json):
    from edge_bench.report import BenchReport

    again = BenchReport.from_dict(report_json)
    assert json.loads(json.dumps(again.to_dict())) == report_json
    assert to_markdown(again) == to_markdown(report)


def test_cli_renders_an_earlier_json(report, tmp_path):
    path = tmp_path / "b.json"
    report.write_json(path)
    result = CliRunner().invoke(cli_main, ["--render", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == to_markdown(report).strip()


def hf_native_tokens(size: tuple[int, int], max_tokens: int, factor: int = 32) -> int:
    """HF's smart_resize (Qwen2-VL image processor) written out: the tokens of `size` at max_pixels."""
    w, h = size
    hb, wb = round(h / factor) * factor, round(w / factor) * factor
    if hb * wb > max_tokens * factor ** 2:
        beta = math.sqrt(h * w / (max_tokens * factor ** 2))
        hb, wb = max(factor, math.floor(h / beta / factor) * factor), max(factor, math.floor(w / beta / factor) * factor)
    return (hb // factor) * (wb // factor)


def max_tokens_of(mmproj: str) -> int:
    """The projector's processor cap in tokens, from its GGUF metadata (clip.vision.image_max_pixels)."""
    from gguf import GGUFReader

    return int(GGUFReader(mmproj).fields["clip.vision.image_max_pixels"].contents()) // 32 ** 2


def run_images_cli(model_dir, tmp_path) -> tuple[str, dict]:
    """edge-bench --images on a tiny model (f16 KV: its 16-wide heads take no q8_0 blocks): (output, cases)."""
    out = tmp_path / "images.json"
    args = [str(model_dir), "--cache-dir", str(tmp_path), "--mmproj-quant", "q8_0", "--cache-type-k", "f16",
            "--ctx-size", "2048", "--repeats", "1", "--images", "--json", str(out), "-q"]
    result = CliRunner().invoke(cli_main, args)
    assert result.exit_code == 0, result.output
    return result.output, json.loads(out.read_text())


def test_cli_images_scenarios(tiny_f16_dir, tmp_path):
    """edge-bench --images: every case measured in its own process; the second process is served from disk."""
    output, cases = run_images_cli(tiny_f16_dir, tmp_path)
    assert "| 4032x3024 JPEG, defaults |" in output and "Encoder efficiency" in output
    assert cases["disk-first"]["images_encoded"] == 1
    assert cases["disk-second"]["images_encoded"] == 0 and cases["disk-second"]["disk_cache_hits"] == 1
    assert cases["attach"]["images_encoded"] == 0  # the attach thread encoded it before the question
    assert cases["4032x3024"]["image"]["source_size"] == [4032, 3024]
    asks = {k: c for k, c in cases.items() if not k.startswith("profile-")}
    assert all(c["ttft_s"] > 0 and c["peak_rss_bytes"] > 0 for c in asks.values())
    # one profiled encode per projector type: stages from the weight names, cosine to the f16 projector
    profiles = {k.removeprefix("profile-"): c for k, c in cases.items() if k.startswith("profile-")}
    assert set(profiles) == {"f16", "bf16", "q8_0", "q6_k", "q5_k", "q4_k"}
    for q, prof in profiles.items():
        stages = {r["stage"] for r in prof["rows"]}
        assert {"patch embedding", "attention", "mlp", "deepstack", "merger"} <= stages, (q, stages)
        assert prof["tokens"] == cases["640x480@300"]["image_tokens"]
    assert profiles["f16"]["cosine_mean"] == pytest.approx(1.0) and profiles["f16"]["reference"] == "f16"
    assert 0.9 < profiles["q4_k"]["cosine_worst"] < 1.0  # quantized: close to, not equal to, the float one
    assert cases["fast"]["ttft_s"] > 0 and "weights not repacked" in cases["fast"]["name"]
    # the projector --mmproj-quant auto picks on this CPU: bf16 where the flags have AVX-512 BF16, else q6_k
    auto = "bf16" if " avx512_bf16" in Path("/proc/cpuinfo").read_text() else "q6_k"
    assert cases["auto-projector"]["mmproj"].endswith(f"-{auto}.gguf") and cases["auto-projector"]["ttft_s"] > 0
    assert f"{auto} projector (--mmproj-quant auto here)" in output
    assert "| attention | FLASH_ATTN_EXT |" in output and "| q8_0 |" in output
    # the phone photo in a fresh process: planned from the load-time calibration, asked three times,
    # each at least auto's floor (the photo's native budget is the processor's 16384-token cap, here
    # the tiny projector's: smart_resize of 4032x3024 at its max_pixels, by hand below)
    fresh = cases["fresh"]
    assert fresh["rates_at_load"] == "calibration" and len(fresh["image_tokens_all"]) == 3
    assert all(t >= 256 for t in fresh["image_tokens_all"]) and fresh["calibration_s"] > 0
    assert fresh["native_tokens"] == hf_native_tokens((4032, 3024), max_tokens_of(fresh["mmproj"]))
    assert f"| {fresh['name']} | {fresh['image_tokens']} (" in output and "Phone photo in a fresh process" in output


def test_transformers_ratio_pairs_first_with_first_and_second_with_second():
    from edge_bench.image_bench import transformers_ratio

    line = transformers_ratio({"name": "case", "ttft_all_s": [10.0, 6.0], "image_tokens": 300},
                              {"ttft_all_s": [5.0, 8.0], "image_tokens": 300})
    assert line == ("case (both 300 image tokens): first ask 10.00 s vs 5.00 s = 2.00; "
                    "second ask 6.00 s vs 8.00 s = 0.75")
    unequal = transformers_ratio({"name": "case", "ttft_all_s": [1.0], "image_tokens": 117},
                                 {"ttft_all_s": [5.0], "image_tokens": 300})
    assert unequal == "case: not compared (117 vs 300 image tokens)"


def test_cli_images_compares_projector_types_with_an_f32_reference(tiny_f32_dir, tmp_path):
    """An f32 conversion is the cosine reference itself (it is none of the compared types)."""
    _, cases = run_images_cli(tiny_f32_dir, tmp_path)
    reference = cases["profile-float"]
    assert reference["reference"] == "float" and reference["cosine_worst"] == pytest.approx(1.0)
    assert 0.999 < cases["profile-f16"]["cosine_worst"] < 1.0  # f16 rounding of f32 weights, measured against them
