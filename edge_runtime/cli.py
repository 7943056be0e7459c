"""`edge-chat`: ask a converted Qwen3-VL about images from the terminal.

With a PROMPT it answers once, streaming to stdout. Without one it opens an
interactive session; the conversation stays in the KV cache between questions.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Iterator

import click

from .chat import VisionChat
from .cli_flags import load_flags, load_settings, parse_gpu_layers
from .errors import EdgeRuntimeError
from .images import ImageError
from .manifest_paths import resolve_model_paths
from .template import TemplateError

HELP = """commands:
  /image PATH   attach an image to the next question (repeatable)
  /reset        start a new conversation (recent images stay encoded)
  /stats        timings and memory of the last answer
  /quit         leave (also Ctrl-D)"""

USER_ERRORS = (EdgeRuntimeError, ImageError, TemplateError, ValueError, TypeError)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("target", type=click.Path(path_type=Path))
@click.argument("prompt", required=False)
@click.option("--mmproj", type=click.Path(path_type=Path), help="Projector GGUF (when TARGET is a text GGUF).")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path), help="Image for the (first) question; repeatable.")
@click.option("--system", "system_prompt", default=None, help="System prompt.")
@click.option("--max-tokens", default=512, show_default=True, type=int)
@click.option("--temperature", default=0.7, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-k", default=20, show_default=True, type=int)
@click.option("--top-p", default=0.8, show_default=True, type=float)
@click.option("--min-p", default=0.0, show_default=True, type=float)
@click.option("--repeat-penalty", default=1.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--stop", "stops", multiple=True, help="Stop string; repeatable.")
@click.option("--json-schema", type=click.Path(exists=True, path_type=Path), help="Constrain the answer to this JSON schema.")
@click.option("--keep-think", is_flag=True, help="Show the reasoning of Thinking models (cut by default).")
@click.option("--n-ctx", default=4096, show_default=True, type=int)
@click.option("--kv-cache-type", default="f16", show_default=True, help="f16, q8_0 or q4_0 (K and V).")
@click.option("--kv-cache-type-k", default=None, help="Override the K cache type.")
@click.option("--kv-cache-type-v", default=None, help="Override the V cache type (quantized V turns on flash attention).")
@click.option("--flash-attn", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True)
@click.option("--n-gpu-layers", default="auto", show_default=True, help="'auto' offloads all layers when a GPU backend exists.")
@click.option("--threads", default=None, type=int, help="Default: physical cores.")
@click.option("--image-min-tokens", default=None, type=int, help="Vision token floor (grounding wants ~1024).")
@click.option("--image-max-tokens", default=None, type=int, help="Vision token cap (fewer = faster).")
@load_flags
@click.option("--stats/--no-stats", default=False, help="Print timings after each answer (stderr).")
@click.option("-v", "--verbose", is_flag=True, help="Show the runtime's and llama.cpp's log.")
def main(
    target: Path,
    prompt: str | None,
    mmproj: Path | None,
    images: tuple[Path, ...],
    system_prompt: str | None,
    stats: bool,
    verbose: bool,
    **settings: Any,
) -> None:
    """Chat with the GGUF pair in TARGET (a converter output directory or a text GGUF)."""
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
    gen = _generation(settings)
    try:
        model, projector = resolve_model_paths(target, mmproj)
        chat = VisionChat(
            model,
            projector,
            n_ctx=settings["n_ctx"],
            kv_cache_type=settings["kv_cache_type"],
            kv_cache_type_k=settings["kv_cache_type_k"],
            kv_cache_type_v=settings["kv_cache_type_v"],
            flash_attn={"on": True, "off": False}.get(settings["flash_attn"], "auto"),
            n_gpu_layers=parse_gpu_layers(settings["n_gpu_layers"]),
            threads=settings["threads"],
            image_min_tokens=settings["image_min_tokens"],
            image_max_tokens=settings["image_max_tokens"],
            system_prompt=system_prompt,
            seed=settings["seed"],
            **load_settings(settings),
        )
    except USER_ERRORS as exc:
        raise click.ClickException(str(exc)) from None
    with chat:
        if prompt is not None:
            try:
                _answer(chat, chat.stream(prompt, list(images), **gen), stats)
            except USER_ERRORS as exc:
                raise click.ClickException(str(exc)) from None
        else:
            _interactive(chat, list(images), gen, stats)


def _generation(settings: dict[str, Any]) -> dict[str, Any]:
    gen = {
        "max_tokens": settings.pop("max_tokens"),
        "temperature": settings.pop("temperature"),
        "top_k": settings.pop("top_k"),
        "top_p": settings.pop("top_p"),
        "min_p": settings.pop("min_p"),
        "repeat_penalty": settings.pop("repeat_penalty"),
        "stop": tuple(settings.pop("stops")),
        "keep_think": settings.pop("keep_think"),
    }
    schema = settings.pop("json_schema")
    if schema is not None:
        try:
            gen["json_schema"] = json.loads(schema.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"{schema}: not JSON ({exc})", param_hint="--json-schema") from None
    return gen


def _answer(chat: VisionChat, pieces: Iterator[str], show_stats: bool) -> None:
    for piece in pieces:
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()
    if show_stats and chat.last_stats is not None:
        click.echo(chat.last_stats.summary(), err=True)


def _interactive(chat: VisionChat, pending: list[Path], gen: dict[str, Any], stats: bool) -> None:
    click.echo(f"edge-chat: {chat.engine.model_path.name}" + (" (vision)" if chat.has_vision else " (text only)"), err=True)
    click.echo(HELP, err=True)
    stdin = sys.stdin
    while True:
        click.echo(f"[{len(pending)} image(s)] > " if pending else "> ", nl=False, err=True)
        line = stdin.readline()
        if not line:
            click.echo(err=True)
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            if command in ("/quit", "/exit", "/q"):
                return
            if command == "/reset":
                chat.reset()
                pending.clear()
                click.echo("(new conversation)", err=True)
            elif command == "/stats":
                click.echo(chat.last_stats.summary() if chat.last_stats else "(no answer yet)", err=True)
            elif command == "/image":
                path = Path(arg.strip()).expanduser()
                if not arg.strip():
                    click.echo("usage: /image PATH", err=True)
                elif not path.is_file():
                    click.echo(f"no such file: {path}", err=True)
                else:
                    pending.append(path)
            else:
                click.echo(HELP, err=True)
            continue
        try:
            _answer(chat, chat.stream(line, pending, **gen), stats)
            pending = []
        except USER_ERRORS as exc:
            click.echo(f"error: {exc}", err=True)
        except KeyboardInterrupt:
            click.echo("\n(interrupted)", err=True)


if __name__ == "__main__":
    main()
