"""`--plot FILE.png`: decode speed against resident memory, one point per party and configuration.

The chart users pick a configuration from: up and to the left is better.
matplotlib is an optional extra (`qwen3-vl-edge[bench]`), imported only here.
"""
from __future__ import annotations

from pathlib import Path

from edge_common.errors import EdgeError

from .options import CHAT_HANDLER, RAW, RUNTIME, TRANSFORMERS
from .report import PARTY_NAMES, BenchReport

MARKERS = {RUNTIME: "o", RAW: "s", CHAT_HANDLER: "^", TRANSFORMERS: "X"}


class PlotUnavailable(EdgeError, RuntimeError):
    """matplotlib is not installed."""


def points(report: BenchReport) -> dict[str, list[tuple[float, float, str]]]:
    """kind -> [(peak RSS MB, decode tok/s, label)]; the transformers run appears once per resolution."""
    out: dict[str, list[tuple[float, float, str]]] = {}
    seen = set()
    for c in report.configs:
        for kind, p in c.parties.items():
            s = p.get("decode_tok_s")
            if s is None or not p.peak_rss_bytes:
                continue
            label = f"bf16 {c.config.resolution}" if kind == TRANSFORMERS else c.config.label
            if (kind, label) in seen:
                continue
            seen.add((kind, label))
            out.setdefault(kind, []).append((p.peak_rss_bytes / 1e6, s.median, label))
    return out


def require_matplotlib():
    """pyplot on the file-only Agg backend, or PlotUnavailable saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable(
            "--plot needs matplotlib: pip install 'qwen3-vl-edge[bench]' (or pip install matplotlib)"
        ) from exc
    return plt


def plot(report: BenchReport, path: str | Path) -> Path:
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for kind, pts in points(report).items():
        xs, ys, labels = zip(*pts)
        ax.scatter(xs, ys, marker=MARKERS.get(kind, "o"), s=60, label=PARTY_NAMES.get(kind, kind))
        if kind == RUNTIME:
            for x, y, label in pts:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    rates = [y for pts in points(report).values() for _, y, _ in pts]
    if rates and min(rates) > 0 and max(rates) / min(rates) > 20:
        ax.set_yscale("log")  # transformers on a CPU is orders of magnitude below the GGUF runtimes
    ax.set_xlabel("peak RSS (MB, whole process)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"edge-bench: {report.model} on {report.machine.get('cpu_model', 'this machine')}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
