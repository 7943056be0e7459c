"""`edge-rpc-worker`: lend this device (CPU, CUDA or Metal, as built) to a host over llama.cpp's RPC backend.

The same installation that runs edge-chat serves its backend to other
machines; no separate C++ build. It is llama.cpp's rpc-server (same flags,
same protocol) started through ctypes. The protocol has no authentication.
"""
from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import threading
from pathlib import Path

import click

from edge_llama import physical_cores
from edge_llama.ggml_devices import DEVICE_ACCEL, DEVICE_CPU, DEVICE_TYPE_NAMES, Device, device_by_name, local_devices
from edge_llama.rpc import DEFAULT_PORT, Endpoint, RpcError, require_rpc, serve


LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SECURITY_WARNING = (
    "WARNING: edge-rpc-worker on {host}: llama.cpp's RPC protocol has no authentication and no encryption;\n"
    "         anyone who can reach this port can run computations and read or write this device's memory.\n"
    "         Never expose it to an untrusted network (use a private link, a firewall or an SSH tunnel)."
)


def default_devices() -> list[Device]:
    """What llama.cpp's rpc-server serves: the accelerators, else the CPU."""
    devices = local_devices()
    accelerators = [d for d in devices if d.kind not in (DEVICE_CPU, DEVICE_ACCEL)]
    return accelerators or [d for d in devices if d.kind == DEVICE_CPU][:1]


def pick_devices(names: str | None) -> list[Device]:
    if not names:
        return default_devices()
    picked = []
    for name in filter(None, (n.strip() for n in names.replace("/", ",").split(","))):
        device = device_by_name(name)
        if device is None or device.is_rpc:
            known = ", ".join(d.name for d in local_devices())
            raise click.BadParameter(f"unknown device {name!r}; this build has: {known}", param_hint="--device")
        picked.append(device)
    return picked


def check_bindable(host: str, port: int) -> None:
    """Fail with a clear message before ggml's server would (it only prints and returns)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as e:
        why = "the port is in use (another worker?)" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise click.UsageError(f"cannot listen on {host}:{port}: {why}") from None


def _stop(signum: int, _frame: object) -> None:
    # ggml's accept loop has no stop call and holds nothing that needs flushing,
    # except a tensor-cache file being written while a host uploads weights
    # (ggml writes it in place): stop workers between loads when using --cache-dir.
    print(f"edge-rpc-worker: stopping ({signal.Signals(signum).name})", flush=True)
    os._exit(0)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback needs --allow-remote.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(1, 65535))
@click.option("--threads", "-t", default=None, type=click.IntRange(min=1), help="CPU threads [default: physical cores].")
@click.option("--device", "-d", "device_names", default=None,
              help="Comma-separated ggml devices to serve (e.g. CUDA0, MTL0, CPU) [default: the GPUs, else the CPU].")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="llama.cpp's tensor cache: weights received once are kept here, so a restarted worker "
                   "is not sent them again [default: no cache].")
@click.option("--allow-remote", is_flag=True,
              help="Listen on a non-loopback address despite the unauthenticated protocol.")
@click.option("--list-devices", is_flag=True, help="Print this machine's devices and exit.")
def main(host: str, port: int, threads: int | None, device_names: str | None, cache_dir: Path | None,
         allow_remote: bool, list_devices: bool) -> None:
    """Serve this machine's llama.cpp backend to edge-chat / edge-serve / edge-bench --rpc HOST:PORT."""
    try:
        require_rpc()
    except RpcError as e:
        raise click.UsageError(str(e)) from None
    if list_devices:
        for d in local_devices():
            click.echo(f"{d.name}\t{DEVICE_TYPE_NAMES.get(d.kind, d.kind)}\t{d.description}\t"
                       f"{d.free >> 20} MiB free of {d.total >> 20} MiB")
        return
    if host not in LOOPBACK:
        click.echo(SECURITY_WARNING.format(host=host), err=True)
        if not allow_remote:
            raise click.UsageError(f"--host {host} is reachable from other machines: add --allow-remote to confirm")
    if ":" in host:
        raise click.BadParameter("ggml-rpc cannot listen on IPv6 literals", param_hint="--host")
    devices = pick_devices(device_names)
    check_bindable(host, port)
    if cache_dir is not None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise click.BadParameter(f"cannot create {cache_dir}: {e.strerror or e}", param_hint="--cache-dir")
    n_threads = threads or physical_cores()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop)
    endpoint = Endpoint(host, port)
    server = threading.Thread(
        target=serve, args=(endpoint, devices, n_threads, str(cache_dir) if cache_dir else None),
        name="ggml-rpc-server", daemon=True,
    )
    server.start()
    names = ", ".join(f"{d.name} ({d.description}, {d.free >> 20} MiB free)" for d in devices)
    print(f"edge-rpc-worker: serving {names} on {endpoint} with {n_threads} threads"
          + (f", tensor cache {cache_dir}" if cache_dir else ""), flush=True)
    # the main thread waits in Python so SIGINT/SIGTERM handlers run
    while server.is_alive():
        server.join(0.5)
    print(f"edge-rpc-worker: the RPC server on {endpoint} stopped (see the message above)", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
