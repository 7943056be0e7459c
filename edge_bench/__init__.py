"""`edge-bench`: speed and memory of VisionChat on this machine, beside raw llama.cpp,
llama-cpp-python's chat handler and transformers, measured in one run.

    from edge_bench import BenchOptions, prepare_synthetic, run_bench, to_markdown
    models = prepare_synthetic("2b", ("q4_k_m",), "q8_0", cache_dir=".cache/synthetic")
    print(to_markdown(run_bench(models, BenchOptions())))

Every measured configuration runs in its own subprocess (see `workers`), so
peak RSS is per configuration. Names are imported lazily: importing this
package loads no model library.
"""
from __future__ import annotations

from edge_common.lazy_exports import lazy_getattr

_EXPORTS = {
    "BenchOptions": "options",
    "Measure": "options",
    "Config": "options",
    "Resolution": "options",
    "ModelSet": "models",
    "prepare_dir": "models",
    "prepare_synthetic": "models",
    "run_bench": "api",
    "BenchReport": "report",
    "to_markdown": "report",
    "plot": "plot",
    "bench_convert": "convert_bench",
    "measure_read_bandwidth": "bandwidth",
    "detect": "machine",
    "main": "cli",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
