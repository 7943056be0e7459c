"""Runs the matrix: every configuration through the runtime and each baseline, one worker at a time.

Workers run strictly one after another (never two at once: they would share
cores and memory bandwidth and measure each other). The runtime and its
baselines for one configuration run back to back, so a load change on a
shared machine hits a pair rather than only one side of a ratio.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from .models import ModelSet
from .options import ACCURACY, MEMORY, RSS_TARGET_CONFIG, RUNTIME, TRANSFORMERS, BenchOptions, Config, Resolution
from .workers import WorkerResult, WorkerSpec, run_worker
from edge_runtime.errors import OptionError

RunWorker = Callable[[WorkerSpec, float], WorkerResult]
# The transformers baseline loads ~4.5 GB in bf16 and decodes at a fraction of a token per
# second on small CPUs: one measured round, no warm-up (the first token is excluded from decode).
TRANSFORMERS_ROUNDS = {"warmup": 0, "repeats": 1}


@dataclass
class ConfigRuns:
    config: Config
    runs: dict[str, WorkerResult] = field(default_factory=dict)
    memory: list[WorkerResult] = field(default_factory=list)  # one per MemoryVariant
    accuracy: WorkerResult | None = None


def memory_config(options: BenchOptions) -> Config:
    """The issue's RSS-target configuration when it is in the matrix, else the first one."""
    configs = list(options.configs())
    return RSS_TARGET_CONFIG if RSS_TARGET_CONFIG in configs else configs[0]


def transformers_config(res: Resolution) -> Config:
    return Config("bf16", "bf16", "bf16", res)


def plan(options: BenchOptions, models: ModelSet, transformers_repeats: int = 1) -> list[WorkerSpec]:
    """Every worker run, in execution order."""
    specs: list[WorkerSpec] = []
    m = options.measure
    for cfg in options.configs():
        text, proj = str(models.text_path(cfg.quant)), str(models.mmproj_path(cfg.mmproj_quant))
        kinds = [RUNTIME, *[b for b in options.baselines if b != TRANSFORMERS]]
        for p in range(options.passes):
            # Odd passes run in reverse order, so neither side of a ratio always goes first.
            for kind in (kinds if p % 2 == 0 else kinds[::-1]):
                specs.append(WorkerSpec(kind, cfg, m, text, proj))
    if options.memory_breakdown:
        from .memory_worker import DEFAULT_VARIANTS

        cfg = memory_config(options)
        text, proj = str(models.text_path(cfg.quant)), str(models.mmproj_path(cfg.mmproj_quant))
        for v in DEFAULT_VARIANTS:
            specs.append(WorkerSpec(MEMORY, cfg, m, text, proj, variant=v.to_dict()))
    if options.accuracy:
        if models.reference is None:
            raise OptionError("accuracy needs the float files the quant types come from: bench --synthetic, or an "
                             "edge-convert directory converted with --quant f16")
        ref = {"text": str(models.reference[0]), "mmproj": str(models.reference[1])}
        for cfg in options.configs():
            specs.append(WorkerSpec(ACCURACY, cfg, m, str(models.text_path(cfg.quant)),
                                    str(models.mmproj_path(cfg.mmproj_quant)), variant=ref))
    if TRANSFORMERS in options.baselines:
        tm = replace(m, warmup=TRANSFORMERS_ROUNDS["warmup"], repeats=max(1, transformers_repeats))
        for res in options.resolutions:
            specs.append(WorkerSpec(TRANSFORMERS, transformers_config(res), tm,
                                    hf_dir=str(models.hf_dir) if models.hf_dir else None))
    return specs


def run_all(specs: list[WorkerSpec], timeout_s: float, *, runner: RunWorker = run_worker,
            on_done: Callable[[WorkerResult], None] = lambda r: None) -> list[WorkerResult]:
    results = []
    for spec in specs:
        result = runner(spec, timeout_s)
        results.append(result)
        on_done(result)
    return results


def merge(a: WorkerResult, b: WorkerResult) -> WorkerResult:
    """Two passes of one party and configuration as one result: samples pooled, the higher peak."""
    samples = {k: a.samples.get(k, []) + b.samples.get(k, []) for k in dict.fromkeys([*a.samples, *b.samples])}
    return WorkerResult(a.kind, a.config, samples, {**a.values, **b.values}, list(dict.fromkeys(a.notes + b.notes)),
                        max(a.peak_rss_bytes, b.peak_rss_bytes), a.wall_s + b.wall_s, a.error or b.error, a.variant)


def group(options: BenchOptions, results: list[WorkerResult]) -> list[ConfigRuns]:
    """Results per configuration; the transformers run joins every configuration of its resolution."""
    groups = {cfg: ConfigRuns(cfg) for cfg in options.configs()}
    for r in results:
        if r.kind == MEMORY:
            if r.config in groups:
                groups[r.config].memory.append(r)
        elif r.kind == ACCURACY:
            if r.config in groups:
                groups[r.config].accuracy = r
        elif r.kind == TRANSFORMERS:
            for cfg, g in groups.items():
                if cfg.resolution == r.config.resolution:
                    g.runs[TRANSFORMERS] = r
        elif r.config in groups:
            runs = groups[r.config].runs
            runs[r.kind] = merge(runs[r.kind], r) if r.kind in runs else r
    return list(groups.values())

