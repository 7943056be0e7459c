"""One command-line vocabulary for edge-convert, edge-chat, edge-serve, edge-bench and the scripts.

Every tool spells a setting the same way, and the way llama.cpp's own tools do
(--ctx-size, --n-gpu-layers, --threads, --batch-size, --ubatch-size,
--cache-type-k/-v, --mmproj, --parallel, --no-mmap), so a setting found with
edge-bench can be pasted into edge-chat, edge-serve or llama-server. Defaults
are passed in from the options dataclasses (EngineOptions, ServerOptions, ...),
never repeated as literals. Every refused input exits with code 2 and a
one-line message on stderr.
"""
from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import click

from .errors import EdgeError

CONTEXT = {"help_option_names": ["-h", "--help"]}
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def fail(prog: str, message: str) -> NoReturn:
    """The one way a CLI refuses: `PROG: error: MESSAGE` on stderr, exit code 2."""
    click.echo(f"{prog}: error: {message}", err=True)
    sys.exit(2)


@contextmanager
def refusals(prog: str, also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn the library's refusals (EdgeError, plus `also`) and Ctrl-C into `fail`."""
    try:
        yield
    except (EdgeError, *also) as exc:
        fail(prog, str(exc))
    except KeyboardInterrupt:
        fail(prog, "interrupted; no finished-looking file was left behind")


def parse_gpu_layers(value: Any) -> int | str:
    """`--n-gpu-layers`: 'auto' or a layer count."""
    if value == "auto" or isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter("use 'auto' or a number of layers") from None


def options(*decorators: Decorator) -> Decorator:
    """Apply click options in the order given (top to bottom in --help)."""
    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command
    return apply


def mmproj() -> Decorator:
    return click.option("--mmproj", type=click.Path(path_type=Path),
                        help="Projector GGUF (when TARGET is a text GGUF).")


def ctx_size(default: int, help: str = "Context length in tokens.") -> Decorator:
    return click.option("--ctx-size", "-c", "n_ctx", type=click.IntRange(min=1), default=default, show_default=True,
                        help=help)


def batch_size(default: int) -> Decorator:
    return click.option("--batch-size", "-b", "n_batch", type=click.IntRange(min=1), default=default,
                        show_default=True, help="Prompt tokens per llama_decode.")


def threads(help: str = "CPU threads [default: physical cores].") -> Decorator:
    return click.option("--threads", "-t", type=click.IntRange(min=1), default=None, help=help)


def n_gpu_layers(default: int | str) -> Decorator:
    return click.option("--n-gpu-layers", "-ngl", default=default, show_default=True,
                        callback=lambda ctx, param, value: parse_gpu_layers(value),
                        help="Layers offloaded to the GPU; 'auto': all of them (and the projector) when a GPU "
                             "backend exists.")


TUNED = " [default: edge-bench --tune's choice for this device and model, else {}]"


def cache_types(default_k: str | None, default_v: str | None) -> Decorator:
    """--cache-type-k / --cache-type-v (edge-bench spells its lists the same way, as llama-bench does);
    a None default: the tuned type, else f16."""
    return options(
        click.option("--cache-type-k", "-ctk", "kv_cache_type_k", default=default_k, show_default=default_k is not None,
                     help="K cache type: f16, q8_0, q4_0, ..." + (TUNED.format("f16") if default_k is None else "")),
        click.option("--cache-type-v", "-ctv", "kv_cache_type_v", default=default_v, show_default=default_v is not None,
                     help="V cache type (a quantized V cache turns flash attention on)."
                          + (TUNED.format("f16") if default_v is None else "")),
    )


def flash_attn(default: bool | str) -> Decorator:
    shown = {True: "on", False: "off"}.get(default, default)  # type: ignore[arg-type]
    return click.option("--flash-attn", "-fa", type=click.Choice(["auto", "on", "off"]), default=shown,
                        show_default=True, callback=lambda ctx, param, v: {"on": True, "off": False}.get(v, v),
                        help="Flash attention.")


def image_tokens() -> Decorator:
    return options(
        click.option("--image-min-tokens", default=None, type=click.IntRange(min=1),
                     help="Vision token floor per image (grounding wants ~1024)."),
        click.option("--image-max-tokens", default=None, type=click.IntRange(min=1),
                     help="Vision token cap per image (fewer = faster)."),
    )


def parallel(default: int) -> Decorator:
    return click.option("--parallel", "-np", default=default, show_default=True, type=click.IntRange(1, 64),
                        help="Sequences (slots) decoded together.")


def load_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """Adds --ubatch-size, --mmap/--no-mmap, --repack/--no-repack, --amx, --rpc, --tensor-split and the
    MoE placement flags (keyword args n_ubatch, mmap, repack, amx, rpc_servers, tensor_split, cpu_moe,
    n_cpu_moe, override_tensor)."""
    return options(
        click.option("--ubatch-size", "-ub", "n_ubatch", default=None, type=click.IntRange(min=1),
                     help="Tokens per forward pass (sizes the compute buffer) [default: the batch on a GPU, "
                          "at most 64 on the CPU]."),
        click.option("--mmap/--no-mmap", "mmap", default=None,
                     help="Map the weights instead of reading them [default: read them when CPU layers are "
                          "repacked, since the mapped pages would stay resident beside the copy]."),
        click.option("--repack/--no-repack", "repack", default=None,
                     help="llama.cpp's interleaved CPU weight layouts (faster matmuls, one more copy with mmap)"
                          + TUNED.format("on") + "."),
        click.option("--amx", "amx", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                     help="Intel AMX for repacked weights: auto = only where a cached probe showed llama.cpp's AMX "
                          "kernels work on this CPU (else repack without AMX); also $EDGE_AMX."),
        rpc_flags(),
        expert_flags(),
    )(command)


def expert_flags() -> Decorator:
    """llama.cpp's --cpu-moe, --n-cpu-moe N and -ot/--override-tensor PATTERN=BUFT (repeatable)."""
    return options(
        click.option("--cpu-moe", "-cmoe", "cpu_moe", is_flag=True,
                     help="Keep every MoE expert weight in host RAM (the rest goes to the GPU / RPC workers)."),
        click.option("--n-cpu-moe", "-ncmoe", "n_cpu_moe", type=click.IntRange(min=0), default=None, metavar="N",
                     help="Keep the MoE expert weights of the first N blocks in host RAM [default: the fewest "
                          "that let the offloaded layers fit free device memory; none on a CPU-only load]."),
        click.option("--override-tensor", "-ot", "override_tensor", multiple=True, metavar="PATTERN=BUFT,...",
                     help="Put tensors whose name the regex PATTERN finds in buffer type BUFT (CPU, CUDA0, "
                          "RPC0[host:port], ...), as llama.cpp's -ot; e.g. -ot exps=CPU."),
    )


def expert_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Pops the expert_flags values from click's kwargs, as EngineOptions' n_cpu_moe / override_tensor."""
    cpu_moe, n_cpu_moe = settings.pop("cpu_moe", False), settings.pop("n_cpu_moe", None)
    if cpu_moe and n_cpu_moe is not None:
        raise click.UsageError("--cpu-moe keeps every expert in host RAM, --n-cpu-moe N those of N blocks: give one")
    return {"n_cpu_moe": "all" if cpu_moe else ("auto" if n_cpu_moe is None else n_cpu_moe),
            "override_tensor": tuple(settings.pop("override_tensor", None) or ())}


def rpc_flags(rpc_help: str = "edge-rpc-worker processes that take a share of the layers (the projector stays "
                                "here).") -> Decorator:
    """--rpc HOST:PORT,... and --tensor-split N0,N1,... (keyword args rpc_servers, tensor_split)."""
    return options(
        click.option("--rpc", "rpc_servers", default=None, callback=_split_rpc, metavar="HOST:PORT,...",
                     help=rpc_help),
        click.option("--tensor-split", "-ts", "tensor_split", default=None, callback=_parse_shares,
                     metavar="N0,N1,...",
                     help="Layer shares with --rpc: this device first, then each worker [default: by free memory]."),
    )


def _split_rpc(_ctx: Any, _param: Any, value: str | None) -> tuple[str, ...] | None:
    """--rpc as llama.cpp spells it (comma-separated); each HOST:PORT is checked when the engine loads."""
    return tuple(s.strip() for s in value.split(",") if s.strip()) if value else None


def _parse_shares(_ctx: Any, _param: Any, value: str | None) -> tuple[float, ...] | None:
    if not value:
        return None
    try:
        shares = tuple(float(x) for x in value.replace("/", ",").split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: use numbers separated by commas, e.g. 1,1,2") from None
    if not all(math.isfinite(s) for s in shares):
        raise click.BadParameter(f"{value!r}: shares must be finite numbers (no nan or inf), e.g. 1,1,2")
    if any(s < 0 for s in shares) or sum(shares) <= 0:
        raise click.BadParameter(f"{value!r}: shares must be >= 0 with a positive sum")
    return shares


def engine_flags(defaults: Any) -> Decorator:
    """The load settings every runtime CLI takes, with `defaults` (an EngineOptions-shaped object) shown."""
    return options(
        cache_types(defaults.kv_cache_type_k, defaults.kv_cache_type_v),
        flash_attn(defaults.flash_attn),
        n_gpu_layers(defaults.n_gpu_layers),
        threads(),
        image_tokens(),
        load_flags,
    )


def load_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Pops the load_flags values from click's kwargs, as EngineOptions / VisionChat keywords."""
    mmap = settings.pop("mmap")
    return {"n_ubatch": settings.pop("n_ubatch"), "mmap": "auto" if mmap is None else mmap,
            "repack": settings.pop("repack"), "amx": settings.pop("amx"),
            "rpc_servers": settings.pop("rpc_servers", None) or (), "tensor_split": settings.pop("tensor_split", None),
            **expert_settings(settings)}


def image_latency(default: float, help: str = "Seconds of image encode + prefill --detail auto aims for.") -> Decorator:
    return click.option("--image-latency", "image_latency_s", default=default, show_default=True,
                        type=click.FloatRange(min=0.001), help=help)


def image_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """Adds --detail, --image-latency and --encoder-cache-dir/--no-encoder-cache."""
    flags = [
        click.option("--detail", type=click.Choice(["low", "auto", "high"]), default="auto", show_default=True,
                     help="Image token budget: low (<= 256 tokens, fastest), auto (the largest that answers within "
                          "--image-latency on this device), high (>= 1024 tokens, for grounding and OCR). "
                          "--image-min-tokens/--image-max-tokens override it."),
        image_latency(8.0),  # EngineOptions.image_latency_s (this layer cannot import the runtime)
        click.option("--encoder-cache-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
                     help="Keep image encoder outputs here across runs [default: encoder/ in the user cache "
                          "dir, $XDG_CACHE_HOME or ~/.cache]."),
        click.option("--no-encoder-cache", is_flag=True, help="Do not keep encoder outputs on disk."),
    ]
    for flag in reversed(flags):
        command = flag(command)
    return command


def image_settings(settings: dict[str, Any], cache_root: Path) -> dict[str, Any]:
    """Pops the image_flags values from click's kwargs, as VisionChat keywords; `cache_root` is the app's cache dir."""
    cache_dir = settings.pop("encoder_cache_dir")
    off = settings.pop("no_encoder_cache")
    return {
        "detail": settings.pop("detail"),
        "image_latency_s": settings.pop("image_latency_s"),
        "encoder_cache_dir": None if off else (cache_dir or cache_root / "encoder"),
        "cost_cache_dir": cache_root,
    }
