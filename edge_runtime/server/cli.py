"""`edge-serve`: serve a converted Qwen3-VL over an OpenAI-compatible HTTP API.

    edge-serve models/ --parallel 4            # http://127.0.0.1:8080/v1
    EDGE_API_KEY=secret edge-serve models/ --host 0.0.0.0
"""
from __future__ import annotations

import errno
import logging
import re
import socket
from pathlib import Path
from typing import Any

import click

from edge_common import cli_options as flags
from edge_common.cli_options import CONTEXT, fail, load_settings
from edge_common.errors import EdgeError
from edge_common.manifest import resolve_model_paths
from edge_llama.rpc import RpcError, parse_endpoints, probe

from edge_runtime.vision.disk_cache import user_cache_dir
from .config import ServerOptions

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*", re.IGNORECASE)  # fullmatch
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """'16MiB', '10M', '512k', '1048576' -> bytes (binary units)."""
    match = _SIZE.fullmatch(str(text))
    if not match:
        # a plain ValueError: SizeParam turns it into click's usage error (exit 2) naming the option
        raise ValueError(f"{text!r} is not a size; use bytes or a number with K, M or G (e.g. 16M)")
    unit = (match.group(2) or "").lower()[:1]
    return int(float(match.group(1)) * _UNITS[unit])


class SizeParam(click.ParamType):
    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DEFAULTS = ServerOptions(Path("."))  # the CLI's defaults are the options'


@click.command(context_settings={**CONTEXT, "show_default": True})
@click.argument("target", type=click.Path(path_type=Path))
@flags.mmproj()
@click.option("--host", default=DEFAULTS.host, help="Address to bind; anything but loopback exposes the model.")
@click.option("--port", default=DEFAULTS.port, type=int)
@flags.parallel(DEFAULTS.parallel)
@flags.ctx_size(DEFAULTS.n_ctx, "KV cells shared by the slots: each gets ctx-size / parallel, as in llama-server.")
@flags.batch_size(DEFAULTS.n_batch)
@flags.engine_flags(DEFAULTS)
@flags.image_flags
@click.option("--encoder-cache-mb", default=DEFAULTS.encoder_cache_mb, type=float, help="Cached vision-encoder outputs.")
@click.option("--api-key", envvar="EDGE_API_KEY", default=None, show_default=False,
              help="Require 'Authorization: Bearer KEY' (all routes but /health). Prefer the EDGE_API_KEY "
                   "variable: a command line is visible to other users.")
@click.option("--admin-key", envvar="EDGE_ADMIN_KEY", default=None, show_default=False,
              help="Key for saving/restoring conversations on the server's disk (EDGE_ADMIN_KEY). Without it, "
                   "a server with --api-key refuses those routes; one with neither leaves them open.")
@click.option("--conversation-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for saved conversations (KV cache + messages); off when unset.")
@click.option("--allow-remote-images", is_flag=True, help="Fetch http(s) image URLs (off: data: URIs only).")
@click.option("--allow-local-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Serve image paths / file:// URLs confined to this directory.")
@click.option("--max-body-bytes", default="16M", type=SizeParam(), help="Largest request body.")
@click.option("--max-image-bytes", default="10M", type=SizeParam(), help="Largest image (encoded).")
@click.option("--timeout", "timeout_s", default=DEFAULTS.timeout_s, type=float, help="Seconds a request may take, queue included.")
@click.option("--queue-size", default=DEFAULTS.queue_size, type=int, help="Requests waiting for a slot before 429.")
@click.option("--max-tokens", "default_max_tokens", default=DEFAULTS.default_max_tokens, type=int, help="Default when a request sets none.")
@click.option("--reasoning-budget", default=DEFAULTS.reasoning_budget, type=click.IntRange(min=-1),
              help="Reasoning tokens of a Thinking model before its answer is forced to start, when a request "
                   "sets no reasoning_budget_tokens; -1: no limit, 0: answer at once.")
@click.option("--allowed-host", "allowed_hosts", multiple=True,
              help="A Host name to answer besides loopback ones (repeatable; '*': any). Other names are refused "
                   "so that a web page cannot reach this server through DNS rebinding.")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="An origin (scheme://host[:port]) whose web pages may call the API (repeatable; '*': any).")
@click.option("--prefill-chunk", default=DEFAULTS.prefill_chunk, type=click.IntRange(1), show_default="n_ubatch",
              help="Prompt tokens evaluated between two decode steps of the running streams.")
@click.option("--engine-process/--in-process", default=DEFAULTS.engine_process,
              help="Run llama.cpp in a child process that is restarted when it dies.")
@click.option("--stall-timeout", "stall_timeout_s", default=DEFAULTS.stall_timeout_s, type=click.FloatRange(0),
              help="Seconds a loaded engine process may stay silent before /health says 'stalled' and it is "
                   "restarted (0: never; needs --engine-process).")
@click.option("--model-id", default=None, help="Model name for /v1/models (default: the directory name).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
def main(target: Path, mmproj: Path | None, log_level: str, flash_attn: bool | str, **settings: Any) -> None:
    """Serve the GGUF pair in TARGET (a converter output directory) at http://HOST:PORT/v1."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        resolve_model_paths(target, mmproj)  # fail now, not after the server is up
        options = server_options(target, mmproj, flash_attn, settings)
    except (EdgeError, ValueError) as exc:
        fail("edge-serve", str(exc))
    sock = listen_socket(options.host, options.port)  # a port in use: said now, before the model loads
    try:  # unreachable RPC workers: a clear error now, not a failed load behind /health
        for endpoint in parse_endpoints(list(options.rpc_servers)):
            probe(endpoint)
    except RpcError as exc:
        fail("edge-serve", str(exc))
    if not options.loopback_only and not options.api_key:
        click.echo(f"edge-serve: warning: listening on {options.host} without an API key: anyone who can reach "
                   "this port can use the model (set EDGE_API_KEY)", err=True)
    serve(options, log_level, sock)


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's bound socket, or exit code 2 naming the address (llama-server exits 1 with
    "couldn't bind HTTP server socket"; here it is a refusal like any bad option). Binding before
    the model loads makes a port in use an instant error rather than one after the load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            fail("edge-serve", f"port {port} on {host} is already in use (another edge-serve or llama-server?): "
                               "stop that process or choose another port with --port")
        fail("edge-serve", f"cannot listen on {host}:{port}: {exc.strerror or exc}; check --host and --port")
    return sock


def server_options(target: Path, mmproj: Path | None, flash_attn: bool | str, settings: dict[str, Any]) -> ServerOptions:
    """The options of a parsed command line (`main.make_context(...).params`, less the log level): what
    edge-serve runs with, also for a benchmark that loads the same engine beside it."""
    return ServerOptions(model_dir=target, mmproj=mmproj, flash_attn=flash_attn, **load_settings(settings),
                         **flags.image_settings(settings, user_cache_dir()), **settings)


# Idle keep-alive connections are closed by the server only after clients let them go: httpx (the
# openai SDK's transport) drops a pooled connection after 5 s idle, uvicorn's default closes it after
# 5 s too, so a request sent on a connection idle for just about 5 s met a socket the server was
# closing ("Server disconnected without sending a response"). nginx's default keepalive_timeout.
KEEP_ALIVE_S = 75


def serve(options: ServerOptions, log_level: str = "info", sock: socket.socket | None = None) -> None:
    import uvicorn

    from .app import create_app

    click.echo(f"edge-serve: http://{options.host}:{options.port}/v1 ({options.parallel} slot(s); "
               "GET /health says when the model is loaded)", err=True)
    config = uvicorn.Config(create_app(options), host=options.host, port=options.port, log_level=log_level,
                            timeout_graceful_shutdown=10, timeout_keep_alive=KEEP_ALIVE_S)
    uvicorn.Server(config).run(sockets=[sock if sock is not None else listen_socket(options.host, options.port)])


if __name__ == "__main__":
    main()
