"""`edge-bench`: speed and memory of the runtime on this machine, beside its baselines.

    edge-bench models/                         # the converted pair, as converted
    edge-bench --synthetic 2b                  # build + convert the 2B-shaped model once, then bench it
    edge-bench --synthetic 2b --quant q4_k_m,q8_0 --kv f16,q8_0 --resolution 640x480,1280x960 \\
               --transformers --json bench.json --plot bench.png
    edge-bench --convert                       # time edge-convert itself (f16 and q4_k_m)

The markdown table goes to stdout; progress and per-run lines to stderr.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edge_common import cli_options as flags
from edge_common.cli_options import load_settings

from .options import BASELINES, DEFAULT_BASELINES, TRANSFORMERS, BenchOptions, Measure, Resolution
from edge_runtime.errors import OptionError
from .report import convert_table, to_markdown

DEFAULT_CACHE = Path(".cache/synthetic")


MEASURE, OPTIONS = Measure(), BenchOptions()  # the CLI's defaults are the options'


def fail(message: str) -> None:
    flags.fail("edge-bench", message)


def split_list(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(p.strip().lower() for p in text.split(",") if p.strip()))


def parse_quants(text: str | None, option: str, projector: bool = False) -> tuple[str, ...]:
    from quant import catalog
    from quant.errors import QuantError

    names = split_list(text or "")
    try:
        return tuple(catalog.lookup_projector(n).name if projector else catalog.canonical(n) for n in names)
    except QuantError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def parse_kv(text: str) -> tuple[str, ...]:
    from edge_llama import kv_type

    names = split_list(text)
    try:
        return tuple(kv_type(n).name for n in names)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--cache-type-k") from None


def parse_resolutions(text: str) -> tuple[Resolution, ...]:
    try:
        return tuple(Resolution.parse(p) for p in text.split(",") if p.strip())
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--resolution") from None


def parse_ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in split_list(text))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers", param_hint=option) from None


def parse_baselines(text: str, transformers: bool) -> tuple[str, ...]:
    names = () if text.strip().lower() == "none" else tuple(n.replace("-", "_") for n in split_list(text))
    unknown = sorted(set(names) - set(BASELINES))
    if unknown:
        raise click.BadParameter(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(BASELINES)} "
                                 "or 'none'", param_hint="--baselines")
    return names + ((TRANSFORMERS,) if transformers and TRANSFORMERS not in names else ())


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("model_dir", required=False, type=click.Path(path_type=Path, file_okay=False))
@click.option("--synthetic", type=click.Choice(["tiny", "2b"]), help="Bench a random-weight checkpoint of this "
              "shape, built and converted into --cache-dir once (real speed and memory, meaningless words).")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False), default=DEFAULT_CACHE,
              show_default=True, help="Where synthetic models and derived quant types are kept.")
@click.option("--quant", default=None, help="Text-model types, comma-separated [default: q4_k_m for --synthetic, "
              "else the converted type]; others are derived from a float conversion.")
@click.option("--mmproj-quant", default=None, help="Projector type [default: q8_0 for --synthetic, else the "
              "converted type].")
@click.option("--cache-type-k", "-ctk", "kv_types", default=",".join(OPTIONS.kv_types), show_default=True,
              help="KV-cache types, comma-separated (as llama-bench; each measured with the same V type).")
@click.option("--cache-type-v", "-ctv", "kv_types_v", default=None,
              help="V types: omit, or repeat --cache-type-k's list (edge-bench measures K and V of one type).")
@click.option("--resolution", "resolutions", default="640x480", show_default=True,
              help="Image sizes WIDTHxHEIGHT, comma-separated.")
@click.option("--prompt-lengths", default="128,512", show_default=True, help="Text prompt lengths for prefill.")
@click.option("--decode-tokens", default=32, show_default=True, help="Tokens generated per first answer.")
@click.option("--repeats", default=3, show_default=True, help="Measured runs per figure.")
@click.option("--warmup", default=1, show_default=True, help="Unmeasured runs before them.")
@click.option("--passes", default=1, show_default=True, help="Alternate the runtime and its baselines this many "
              "times, pooling the runs (steadier ratios on a busy machine).")
@flags.ctx_size(MEASURE.n_ctx)
@flags.batch_size(MEASURE.n_batch)
@flags.load_flags
@click.option("--extra-bufts", "extra_bufts", default="auto", show_default=True,
              help="How weights use llama.cpp's CPU extra buffer types, comma-separated modes measured side by side: "
                   "auto (the runtime's choice: AMX only where its probe passed), amx (llama.cpp's default, AMX "
                   "included), repack (CPU_REPACK without AMX), none (plain CPU buffers).")
@flags.threads()
@flags.n_gpu_layers("auto")
@flags.flash_attn(MEASURE.flash_attn)
@click.option("--image-max-tokens", type=int, default=None, help="Image token budget (sizes the vision "
              "compute buffer) [default: the projector's].")
@click.option("--baselines", default=",".join(DEFAULT_BASELINES), show_default=True,
              help=f"Comma-separated from {', '.join(BASELINES)}, or 'none'.")
@click.option("--transformers", "with_transformers", is_flag=True,
              help="Add the transformers bf16 CPU baseline (needs the convert extra and ~5 GB RAM).")
@click.option("--transformers-repeats", default=1, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Write every figure, sample and the machine to this file.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Decode tok/s against peak RSS as a PNG (needs matplotlib).")
@click.option("--convert", "convert", is_flag=True, help="Also time edge-convert on the synthetic checkpoint.")
@click.option("--convert-targets", default="f16,q4_k_m", show_default=True)
@click.option("--memory-breakdown", is_flag=True, help="Also load the q4_k_m/q8_0/KV q8_0/640x480 "
              "configuration (or the first one) step by step under several load settings: RSS per step and peak.")
@click.option("--accuracy", is_flag=True, help="Also measure each configuration's divergence from the float "
              "files (KL, top-1 agreement, image-embedding cosine; needs the float conversion).")
@click.option("--render", "render_path", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Measure nothing: print the tables (and --plot) of an earlier --json file.")
@click.option("--images", "images_bench", is_flag=True, help="Measure the image scenarios instead: a 4032x3024 "
              "photo and 640x480 with the defaults, attach then ask, the encoder cache on disk in a second "
              "process, encoder efficiency, and transformers bf16 at the same image tokens (with --transformers).")
@click.option("--must-show", is_flag=True, help="With --images: only the cases the image targets read (640x480 "
              "at 300 tokens, a phone photo asked three times in a fresh process, transformers with "
              "--transformers): a few minutes on 2 cores.")
@click.option("--tune", is_flag=True, help="Measure repack, flash attention (text and projector), threads, ubatch "
              "and KV type on this device, one at a time from the defaults, store the fastest per workload (image: "
              "first-image TTFT at 300 tokens; chat: decode) as the runtime's defaults for this model pair, and "
              "check the defaults after tuning against the sweep's best: a few minutes on 2 cores.")
@click.option("--no-bandwidth", is_flag=True, help="Skip the memory bandwidth measurement (and the roofline).")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds allowed per worker.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def main(model_dir, synthetic, cache_dir, quant, mmproj_quant, kv_types, kv_types_v, resolutions, prompt_lengths,
         decode_tokens, repeats, warmup, passes, n_ctx, n_batch, n_ubatch, mmap, repack, amx, rpc_servers,
         tensor_split, cpu_moe, n_cpu_moe, override_tensor, extra_bufts, threads, n_gpu_layers,
         flash_attn, image_max_tokens, baselines, with_transformers, transformers_repeats, json_path, plot_path,
         convert, convert_targets, memory_breakdown, accuracy, render_path, images_bench, must_show, tune, no_bandwidth,
         timeout, quiet) -> None:
    """Measure load time, image encoding, prefill, decode, time to first token and peak memory of
    VisionChat for each quant x KV-cache type x image size, beside raw llama.cpp, llama-cpp-python's
    chat handler and (optionally) transformers, in one run."""
    from edge_llama import physical_cores
    from edge_llama.offload import resolve_gpu_layers
    from .models import BenchSetupError

    if model_dir and synthetic:
        fail("give MODEL_DIR or --synthetic, not both")
    if kv_types_v is not None and split_list(kv_types_v) != split_list(kv_types):
        fail("--cache-type-v must be omitted or equal --cache-type-k: edge-bench measures K and V of one type")
    if flash_attn == "auto":
        fail("--flash-attn: edge-bench compares parties with flash attention fixed; use on or off")
    if render_path:
        render(render_path, plot_path)
        return
    if not (model_dir or synthetic or convert):
        fail("nothing to bench: give an edge-convert output directory, --synthetic 2b, or --convert")
    if plot_path and not (model_dir or synthetic):
        fail("--plot needs a model to bench")
    if plot_path:
        from .plot import PlotUnavailable, require_matplotlib

        try:
            require_matplotlib()
        except PlotUnavailable as exc:
            fail(str(exc))
    log = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
    if tune:
        if not (model_dir or synthetic):
            fail("--tune needs a model: an edge-convert output directory or --synthetic 2b")
        run_tuning(model_dir, synthetic, cache_dir, quant, mmproj_quant, json_path, quiet, log)
        return
    if images_bench:
        if not (model_dir or synthetic):
            fail("--images needs a model: an edge-convert output directory or --synthetic 2b")
        run_images(model_dir, synthetic, cache_dir, quant, mmproj_quant, kv_types, n_ctx, repeats,
                   threads or physical_cores(), with_transformers, timeout, json_path, quiet, log, must_show)
        return
    sections: list[str] = []
    json_out: dict = {}
    try:
        if model_dir or synthetic:
            load = load_settings({"n_ubatch": n_ubatch, "mmap": mmap, "repack": repack is not False, "amx": amx,
                                  "rpc_servers": rpc_servers, "tensor_split": tensor_split, "cpu_moe": cpu_moe,
                                  "n_cpu_moe": n_cpu_moe, "override_tensor": override_tensor})
            load.pop("amx")
            modes = parse_extra_bufts(extra_bufts, amx)
            if rpc_servers and baselines != "none":
                log("edge-bench: with --rpc only VisionChat is measured (the baselines cannot use workers)")
                baselines = "none"
            measure = Measure(n_ctx=n_ctx, n_batch=n_batch, **load, threads=threads or physical_cores(),
                              flash_attn=flash_attn, n_gpu_layers=resolve_gpu_layers(n_gpu_layers),
                              image_max_tokens=image_max_tokens,
                              prompt_lengths=parse_ints(prompt_lengths, "--prompt-lengths"),
                              decode_tokens=decode_tokens, warmup=warmup, repeats=repeats)
            report = bench_models(model_dir, synthetic, cache_dir, quant, mmproj_quant, measure,
                                  kv=parse_kv(kv_types), resolutions=parse_resolutions(resolutions),
                                  baselines=parse_baselines(baselines, with_transformers),
                                  transformers_repeats=transformers_repeats, bandwidth=not no_bandwidth,
                                  memory_breakdown=memory_breakdown, accuracy=accuracy, passes=passes,
                                  timeout=timeout, quiet=quiet, log=log, extra_bufts=modes)
            if convert:
                report.convert = run_convert(synthetic or "2b", cache_dir, convert_targets, log)
            sections.append(to_markdown(report))
            json_out = report.to_dict()
            if plot_path:
                from .plot import plot

                log(f"edge-bench: plot written to {plot(report, plot_path)}")
        else:
            rows = run_convert(synthetic or "2b", cache_dir, convert_targets, log)
            sections.append("\n".join(["### Converter (edge-convert)", "", *convert_table(rows), ""]))
            json_out = {"convert": rows}
    except (BenchSetupError, ValueError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted")
    click.echo("\n".join(sections))
    if json_path:
        json_path.write_text(json.dumps(json_out, indent=2) + "\n", encoding="utf-8")
        log(f"edge-bench: figures written to {json_path}")
    dead = all_parties_failed(json_out)
    if dead:
        click.echo("edge-bench: every party failed for " + "; ".join(dead) + " (see the notes for why)", err=True)
        sys.exit(1)


def all_parties_failed(report: dict) -> list[str]:
    """Labels of the configurations whose every measured party failed (a figure-less run is a failure)."""
    from .options import Config

    dead = []
    for c in report.get("configs", []):
        parties = c.get("parties", {})
        if parties and all(p.get("error") for p in parties.values()):
            dead.append(Config.from_dict(c["config"]).label)
    return dead


def parse_extra_bufts(text: str, amx: str) -> tuple[str, ...]:
    from .options import EXTRA_BUFTS

    modes = split_list(text)
    bad = sorted(set(modes) - set(EXTRA_BUFTS))
    if bad or not modes:
        raise click.BadParameter(f"unknown mode(s) {', '.join(bad) or repr(text)}; choose from {', '.join(EXTRA_BUFTS)}",
                                 param_hint="--extra-bufts")
    if modes == ("auto",) and amx != "auto":  # --amx on|off is a single-mode shorthand
        return ("amx",) if amx == "on" else ("repack",)
    return modes


def run_images(model_dir, synthetic, cache_dir, quant, mmproj_quant, kv_types, n_ctx, repeats, threads,
               with_transformers, timeout, json_path, quiet, log, must_show=False) -> None:
    from edge_llama.hardware import fastest_projector_type, this_cpuinfo
    from edge_llama.offload import gpu_offload_available

    from .image_bench import PROJECTOR_TYPES, ImageBenchSetup, image_bench_markdown, run_image_bench
    from .machine import detect
    from .models import BenchSetupError

    auto_q = fastest_projector_type(this_cpuinfo(), gpu_offload_available())[0]
    try:
        models, q, proj = resolve_models(model_dir, synthetic, cache_dir, quant, mmproj_quant, quiet, log,
                                         extra_mmproj=(auto_q,) if must_show else PROJECTOR_TYPES)
        setup = ImageBenchSetup(
            text=models.text_path(q[0]), mmproj=models.mmproj_path(proj), projectors=dict(models.mmproj),
            mmproj_float=models.reference[1] if models.reference else None, hf_dir=models.hf_dir,
            threads=threads, kv=parse_kv(kv_types)[0],
            n_ctx=n_ctx, repeats=min(repeats, 2), transformers=with_transformers, timeout=timeout,
            must_show=must_show, auto_mmproj=(auto_q, models.mmproj[auto_q]) if auto_q in models.mmproj else None)
        cases = run_image_bench(setup, log)
    except (BenchSetupError, ValueError, RuntimeError) as exc:
        fail(str(exc))
    settings = (f"Settings: {setup.text.name} + {setup.mmproj.name}, KV {setup.kv}, n_ctx {setup.n_ctx}, "
                f"{setup.threads} thread(s), median of {setup.repeats} asks per case (1 for the disk-cache cases), "
                "defaults otherwise (detail auto, latency target 8 s, cost model measured by the first case).")
    click.echo(image_bench_markdown(cases, detect().one_line(), settings))
    if json_path:
        json_path.write_text(json.dumps(cases, indent=2) + "\n", encoding="utf-8")


def run_tuning(model_dir, synthetic, cache_dir, quant, mmproj_quant, json_path, quiet, log) -> None:
    from .machine import detect
    from .models import BenchSetupError
    from .tune import TuneSetup, run_tune, tune_markdown

    try:
        models, q, proj = resolve_models(model_dir, synthetic, cache_dir, quant, mmproj_quant, quiet, log)
        result = run_tune(TuneSetup(text=models.text_path(q[0]), mmproj=models.mmproj_path(proj)), log,
                          progress=not quiet)
    except (BenchSetupError, ValueError, RuntimeError) as exc:
        fail(str(exc))
    click.echo(tune_markdown(result, detect().one_line()))
    if json_path:
        json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def render(json_path: Path, plot_path: Path | None) -> None:
    from .report import BenchReport

    try:
        report = BenchReport.from_dict(json.loads(json_path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as exc:
        fail(f"{json_path} is not an edge-bench --json file ({exc})")
    click.echo(to_markdown(report))
    if plot_path:
        from .plot import PlotUnavailable, plot

        try:
            plot(report, plot_path)
        except PlotUnavailable as exc:
            fail(str(exc))


def resolve_models(model_dir, synthetic, cache_dir: Path, quant: str | None, mmproj_quant: str | None,
                   quiet: bool, log, extra_mmproj: tuple[str, ...] = ()):
    """(ModelSet, text types, projector type): a synthetic model or an output directory, derived types cached."""
    from .models import prepare_dir, prepare_synthetic, read_manifest

    if synthetic:
        quants = parse_quants(quant or "q4_k_m", "--quant")
        proj = parse_quants(mmproj_quant or "q8_0", "--mmproj-quant", projector=True)[0]
        models = prepare_synthetic(synthetic, quants, proj, cache_dir=cache_dir, progress=not quiet, log=log,
                                   extra_mmproj=extra_mmproj)
    else:
        manifest = read_manifest(model_dir)
        quants = parse_quants(quant or manifest["text"]["type"], "--quant")
        proj = parse_quants(mmproj_quant or manifest["mmproj"]["type"], "--mmproj-quant", projector=True)[0]
        models = prepare_dir(model_dir, quants, proj, cache_dir=cache_dir / Path(model_dir).resolve().name,
                             progress=not quiet, log=log, extra_mmproj=extra_mmproj)
    return models, quants, proj


def bench_models(model_dir, synthetic, cache_dir: Path, quant: str | None, mmproj_quant: str | None,
                 measure: Measure, *, kv, resolutions, baselines, transformers_repeats: int, bandwidth: bool,
                 memory_breakdown: bool, accuracy: bool, passes: int, timeout: float, quiet: bool, log,
                 extra_bufts: tuple[str, ...] = ("auto",)):
    from .api import run_bench

    models, quants, proj = resolve_models(model_dir, synthetic, cache_dir, quant, mmproj_quant, quiet, log)
    if TRANSFORMERS in baselines and models.hf_dir is None:
        raise OptionError("--transformers needs the Hugging Face checkpoint: the manifest's source path is missing")
    options = BenchOptions(quants=quants, mmproj_quant=proj, kv_types=kv, resolutions=resolutions, measure=measure,
                           baselines=baselines, worker_timeout_s=timeout, bandwidth=bandwidth,
                           memory_breakdown=memory_breakdown, accuracy=accuracy, passes=passes,
                           extra_bufts=extra_bufts)
    return run_bench(models, options, transformers_repeats=transformers_repeats, progress=not quiet, log=log)


def run_convert(size: str, cache_dir: Path, targets: str, log) -> list[dict]:
    from .convert_bench import bench_convert
    from .models import ensure_synthetic, synthetic_paths

    ensure_synthetic(size, cache_dir, log=log)
    ckpt = synthetic_paths(size, cache_dir)[0]
    rows = []
    for target in split_list(targets):
        log(f"edge-bench: timing edge-convert {ckpt.name} -> {target}")
        run = bench_convert(ckpt, target, cache_dir)
        log(f"edge-bench: {target}: {run.wall_s:.0f} s, peak RSS {run.peak_rss_bytes / 1e6:.0f} MB"
            + (f" (failed: {run.error})" if run.error else ""))
        rows.append(run.to_dict())
    return rows


if __name__ == "__main__":
    main()
