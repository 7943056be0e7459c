"""`edge-chat`: ask a converted Qwen3-VL about images and videos from the terminal.

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

from edge_common import cli_options as flags
from edge_common.cli_options import CONTEXT, fail, load_settings
from edge_common.errors import EdgeError
from edge_common.manifest import resolve_model_paths

from edge_runtime.chat.chat import VisionChat
from edge_runtime.vision.images import ImageError
from edge_runtime.core.options import EngineOptions, GenerationOptions
from edge_runtime.vision.disk_cache import user_cache_dir
from edge_runtime.vision.video import DEFAULT_FPS, VideoError, VideoOptions

HELP = """commands:
  /image PATH   attach an image to the next question (repeatable)
  /video PATH   attach a video to the next question (repeatable)
  /reset        start a new conversation (recent images stay encoded)
  /stats        timings and memory of the last answer
  /quit         leave (also Ctrl-D)"""

PROG = "edge-chat"
USER_ERRORS = (EdgeError, ValueError, TypeError)


ENGINE, GEN = EngineOptions(), GenerationOptions()  # the CLI's defaults are the API's


@click.command(context_settings=CONTEXT)
@click.argument("target", type=click.Path(path_type=Path))
@click.argument("prompt", required=False)
@flags.mmproj()
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path), help="Image for the (first) question; repeatable.")
@click.option("--video", "videos", multiple=True, type=click.Path(path_type=Path), help="Video for the (first) question; repeatable (needs the [video] extra).")
@click.option("--video-fps", default=DEFAULT_FPS, show_default=True, type=float,
              help="Frames sampled per second of video (the model family's rate).")
@click.option("--video-max-frames", default=None, type=int, help="Most frames per video (default: what the token budget affords).")
@click.option("--video-max-tokens", default=None, type=int, help="Vision tokens for one whole video (default: 512 on a CPU, 2048 on a GPU).")
@click.option("--system", "system_prompt", default=None, help="System prompt.")
@click.option("--max-tokens", default=GEN.max_tokens, show_default=True, type=int)
@click.option("--temperature", default=GEN.temperature, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-k", default=GEN.top_k, show_default=True, type=int)
@click.option("--top-p", default=GEN.top_p, show_default=True, type=float)
@click.option("--min-p", default=GEN.min_p, show_default=True, type=float)
@click.option("--repeat-penalty", default=GEN.repeat_penalty, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--stop", "stops", multiple=True, help="Stop string; repeatable.")
@click.option("--json-schema", type=click.Path(exists=True, path_type=Path), help="Constrain the answer to this JSON schema.")
@click.option("--keep-think", is_flag=True, help="Show the reasoning of Thinking models (cut by default).")
@click.option("--reasoning-budget", default=-1, show_default=True, type=click.IntRange(min=-1),
              help="Reasoning tokens of a Thinking model before its answer is forced to start; -1: no limit, "
                   "0: answer at once (llama.cpp's flag). They count toward --max-tokens.")
@flags.ctx_size(ENGINE.n_ctx)
@flags.batch_size(ENGINE.n_batch)
@flags.engine_flags(ENGINE)
@flags.image_flags
@click.option("--stats/--no-stats", default=False, help="Print timings after each answer (stderr).")
@click.option("-v", "--verbose", is_flag=True, help="Show the runtime's and llama.cpp's log.")
def main(
    target: Path,
    prompt: str | None,
    mmproj: Path | None,
    images: tuple[Path, ...],
    videos: tuple[Path, ...],
    video_fps: float,
    video_max_frames: int | None,
    video_max_tokens: int | None,
    system_prompt: str | None,
    stats: bool,
    verbose: bool,
    **settings: Any,
) -> None:
    """Chat with the GGUF pair in TARGET (a converter output directory or a text GGUF)."""
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
    gen = _generation(settings)
    try:  # sampling settings are checked before minutes of loading: a bad one is a usage error (exit code 2)
        GenerationOptions().updated(gen)
    except (ValueError, TypeError) as exc:
        raise click.UsageError(str(exc)) from None
    try:
        video = VideoOptions(fps=video_fps, max_frames=video_max_frames, max_tokens=video_max_tokens)
    except VideoError as exc:
        fail(PROG, f"--video-fps/--video-max-frames/--video-max-tokens: {exc}")
    try:
        model, projector = resolve_model_paths(target, mmproj)
        chat = VisionChat(
            model,
            projector,
            n_ctx=settings["n_ctx"],
            n_batch=settings["n_batch"],
            kv_cache_type_k=settings["kv_cache_type_k"],
            kv_cache_type_v=settings["kv_cache_type_v"],
            flash_attn=settings["flash_attn"],
            n_gpu_layers=settings["n_gpu_layers"],
            threads=settings["threads"],
            image_min_tokens=settings["image_min_tokens"],
            image_max_tokens=settings["image_max_tokens"],
            system_prompt=system_prompt,
            seed=settings["seed"],
            video=video,
            **load_settings(settings),
            **flags.image_settings(settings, user_cache_dir()),
        )
    except USER_ERRORS as exc:
        fail(PROG, str(exc))
    with chat:
        if prompt is not None:
            try:
                _answer(chat, chat.stream(prompt, list(images), list(videos), **gen), stats)
            except USER_ERRORS as exc:
                fail(PROG, str(exc))
        else:
            _interactive(chat, list(images), list(videos), gen, stats)


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
    budget = settings.pop("reasoning_budget")
    if budget != -1:
        gen["max_thinking_tokens"] = budget
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


def _interactive(chat: VisionChat, pending: list[Path], clips: list[Path], gen: dict[str, Any], stats: bool) -> None:
    click.echo(f"edge-chat: {chat.engine.model_path.name}" + (" (vision)" if chat.has_vision else " (text only)"), err=True)
    click.echo(HELP, err=True)
    stdin = sys.stdin
    while True:
        attached = ", ".join(f"{n} {what}(s)" for n, what in ((len(pending), "image"), (len(clips), "video")) if n)
        click.echo(f"[{attached}] > " if attached else "> ", nl=False, err=True)
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
                clips.clear()
                click.echo("(new conversation)", err=True)
            elif command == "/stats":
                click.echo(chat.last_stats.summary() if chat.last_stats else "(no answer yet)", err=True)
            elif command in ("/image", "/video"):
                path = Path(arg.strip()).expanduser()
                if not arg.strip():
                    click.echo(f"usage: {command} PATH", err=True)
                elif not path.is_file():
                    click.echo(f"no such file: {path}", err=True)
                else:
                    (pending if command == "/image" else clips).append(path)
            else:
                click.echo(HELP, err=True)
            continue
        try:
            _answer(chat, chat.stream(line, pending, clips, **gen), stats)
            pending, clips = [], []
        except ImageError as exc:  # an image that cannot be read would fail every following question
            click.echo(f"error: {exc}", err=True)
            pending, clips = [], []
            click.echo("(the pending image(s) and clip(s) were dropped; attach them again)", err=True)
        except USER_ERRORS as exc:
            click.echo(f"error: {exc}", err=True)
        except KeyboardInterrupt:
            click.echo("\n(interrupted)", err=True)


if __name__ == "__main__":
    main()
