"""`run_bench`: the whole measurement as one library call (the CLI is a thin shell around it)."""
from __future__ import annotations

import sys
from typing import Callable

from .models import ModelSet
from .options import BenchOptions
from .report import BenchReport, build_config_report
from .roofline import gguf_tensor_bytes, weight_bytes_read
from .runner import group, plan, run_all
from .summary import summarize_all
from .workers import WorkerResult, WorkerSpec, run_worker

Log = Callable[[str], None]


def describe(result: WorkerResult) -> str:
    if result.error:
        return f"{result.kind} {result.config.label}: FAILED ({result.error[:200]})"
    figures = summarize_all(result.samples)
    parts = [f"{result.kind} {result.config.label}: {result.wall_s:.0f} s"]
    if "decode_tok_s" in figures:
        parts.append(f"decode {figures['decode_tok_s'].median:.2f} tok/s")
    for name in ("ttft_first_s", "ttft_followup_s"):
        if name in figures:
            parts.append(f"{name.removesuffix('_s').replace('_', ' ')} {figures[name].median:.2f} s")
    parts.append(f"peak RSS {result.peak_rss_bytes / 1e6:.0f} MB")
    return ", ".join(parts)


def run_bench(models: ModelSet, options: BenchOptions, *, transformers_repeats: int = 1, progress: bool = True,
              log: Log = lambda s: None, runner: Callable[[WorkerSpec, float], WorkerResult] = run_worker,
              machine: dict | None = None) -> BenchReport:
    """Measure every configuration with the runtime and the chosen baselines, and build the report."""
    from tqdm import tqdm

    from .bandwidth import measure_read_bandwidth
    from .machine import detect

    if machine is None:
        info = detect()
        machine = {**info.to_dict(), "summary": info.one_line()}
    bandwidth = None
    if options.bandwidth:
        log("edge-bench: measuring memory read bandwidth")
        bandwidth = measure_read_bandwidth(options.measure.threads).to_dict()
    specs = plan(options, models, transformers_repeats)
    with tqdm(total=len(specs), desc="edge-bench", unit="run", disable=not progress, leave=False) as bar:
        def done(r: WorkerResult) -> None:
            bar.update(1)
            if progress:
                bar.write(describe(r), file=sys.stderr)

        results = run_all(specs, options.worker_timeout_s, runner=runner, on_done=done)
    weights = {q: weight_bytes_read(gguf_tensor_bytes(models.text_path(q))) for q in options.quants}
    configs = [
        build_config_report(
            runs, text_bytes=models.text_path(runs.config.quant).stat().st_size,
            mmproj_bytes=models.mmproj_path(runs.config.mmproj_quant).stat().st_size,
            weight_bytes=weights[runs.config.quant], n_ctx=options.measure.n_ctx,
            bandwidth_bytes_s=bandwidth["bytes_per_s"] if bandwidth else None)
        for runs in group(options, results)
    ]
    return BenchReport(models.name, machine, options, bandwidth, configs)

