"""Command-line flags that edge-chat, edge-serve and edge-bench share.

Each tool spells a load setting the same way (and the way llama.cpp's own
tools do: --ubatch-size, --no-mmap, --no-repack), so a setting found with
edge-bench can be pasted into edge-chat or edge-serve.
"""
from __future__ import annotations

from typing import Any, Callable

import click


def parse_gpu_layers(value: str) -> int | str:
    """`--n-gpu-layers`: 'auto' or a layer count."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter("use 'auto' or a number of layers") from None


def load_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """Adds --ubatch-size, --mmap/--no-mmap and --repack/--no-repack (keyword args n_ubatch, mmap, repack)."""
    flags = [
        click.option("--ubatch-size", "n_ubatch", default=None, type=click.IntRange(min=1),
                     help="Tokens per forward pass (sizes the compute buffer) [default: the batch on a GPU, "
                          "at most 64 on the CPU]."),
        click.option("--mmap/--no-mmap", "mmap", default=None,
                     help="Map the weights instead of reading them [default: read them when CPU layers are "
                          "repacked, since the mapped pages would stay resident beside the copy]."),
        click.option("--repack/--no-repack", "repack", default=True, show_default=True,
                     help="llama.cpp's interleaved CPU weight layouts (faster matmuls, one more copy with mmap)."),
    ]
    for flag in reversed(flags):
        command = flag(command)
    return command


def load_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Pops the load_flags values from click's kwargs, as EngineOptions / VisionChat keywords."""
    mmap = settings.pop("mmap")
    return {"n_ubatch": settings.pop("n_ubatch"), "mmap": "auto" if mmap is None else mmap,
            "repack": settings.pop("repack")}
