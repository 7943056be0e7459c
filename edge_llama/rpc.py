"""llama.cpp's RPC backend (ggml-rpc): lend this device to others, use other machines' devices.

We do not write a distributed runner: ggml-rpc is the engine. A worker runs
`ggml_backend_rpc_start_server` over its local device; a host adds each worker
with `ggml_backend_rpc_add_server` and hands the resulting devices to
llama_model_params.devices, so llama.cpp places whole layers on them.

What ggml-rpc does on failure decides what we can promise (ggml-rpc.cpp, v7):
- connecting to a dead or wrong endpoint GGML_ABORTs the process, and a
  blackholed host blocks in connect() for minutes; so every endpoint is first
  checked here with a plain socket and our own HELLO handshake under a timeout,
  and only a worker that answered is given to ggml;
- a worker lost mid-answer (`RPC_STATUS_ASSERT`) GGML_ABORTs as well: nothing
  in-process can recover the C++ state. `guard_workers` installs a ggml abort
  callback that names the lost worker on stderr and ends the process with
  exit code WORKER_LOST_EXIT (75, EX_TEMPFAIL) instead of a core dump; a worker
  that stops answering without closing the socket is caught by `DecodeWatchdog`
  and ends the same way. A caller that must survive runs the engine in a
  supervised process (edge-serve under systemd, or a child process) and
  restarts it; the next load reconnects.
The protocol has no authentication: never expose a worker to an untrusted network.
"""
from __future__ import annotations

import ctypes
import functools
import os
import re
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import llama_cpp
from edge_common.errors import EdgeError

from .backend import ensure_backend
from .ggml_devices import Device, describe, open_lib, registry

DEFAULT_PORT = 50052
DEFAULT_TIMEOUT_S = 5.0
# the wait for a connected worker's HELLO: this many connection round trips, at least HANDSHAKE_MIN_S
HANDSHAKE_MIN_S, HANDSHAKE_RTTS = 1.0, 50
WORKER_LOST_EXIT = 75  # EX_TEMPFAIL: try again once the worker is back

# ggml-rpc.cpp wire format: | cmd u8 | size u64 | payload | -> | size u64 | payload |
_RPC_CMD_HELLO = 14
_CONN_CAPS = 24  # RPC_CONN_CAPS_SIZE
PROTO_MAJOR = 7  # RPC_PROTO_MAJOR_VERSION of the llama.cpp vendored by llama-cpp-python 0.3.36

REBUILD_HINT = (
    "rebuild llama-cpp-python with RPC on: `make setup` does it, or "
    'CMAKE_ARGS="-DGGML_RPC=on" pip install llama-cpp-python==0.3.36 --no-binary llama-cpp-python '
    "--force-reinstall --no-cache-dir"
)


class RpcError(EdgeError):
    """A problem with llama.cpp's RPC backend or one of its workers."""


class RpcUnavailableError(RpcError, RuntimeError):
    """llama-cpp-python was built without GGML_RPC."""


class RpcEndpointError(RpcError, ValueError):
    """A worker address that is not HOST:PORT."""


class WorkerUnreachableError(RpcError, ConnectionError):
    """A worker did not accept the connection or answer the handshake within the timeout."""


# ---------------------------------------------------------------- addresses


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_endpoint(text: str, default_port: int | None = None) -> Endpoint:
    """"host:port" (ggml-rpc splits at the first ':', so IPv6 literals are refused)."""
    raw = str(text).strip()
    host, sep, port = raw.partition(":")
    if not sep and default_port is not None:
        port = str(default_port)
    if not host or ":" in port or not port.isdigit() or not 0 < int(port) < 65536:
        raise RpcEndpointError(
            f"RPC worker {text!r}: expected HOST:PORT such as 192.168.1.20:{DEFAULT_PORT} "
            "(IPv6 literals are not supported by ggml-rpc; use a host name)"
        )
    return Endpoint(host, int(port))


def parse_endpoints(items: Iterable[str] | str) -> list[Endpoint]:
    """A list, or one comma-separated string as llama.cpp's --rpc takes."""
    if isinstance(items, str):
        items = items.split(",")
    endpoints = [parse_endpoint(i) for i in items if str(i).strip()]
    if len(set(endpoints)) != len(endpoints):
        raise RpcEndpointError(f"RPC worker listed twice: {', '.join(map(str, endpoints))}")
    return endpoints


# ---------------------------------------------------------------- the library


def rpc_supported() -> bool:
    ensure_backend()  # a GGML_BACKEND_DL build registers RPC only once its library is loaded
    return bool(llama_cpp.llama_supports_rpc()) and open_lib("ggml-rpc") is not None


def require_rpc() -> None:
    if not rpc_supported():
        raise RpcUnavailableError(f"this llama-cpp-python was built without llama.cpp's RPC backend; {REBUILD_HINT}")


class _RpcLib:
    def __init__(self) -> None:
        require_rpc()
        lib = open_lib("ggml-rpc")
        vp, sz, cp = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
        self.add_server = lib.ggml_backend_rpc_add_server
        self.add_server.argtypes, self.add_server.restype = [cp], vp
        self.get_device_memory = lib.ggml_backend_rpc_get_device_memory
        self.get_device_memory.argtypes = [cp, ctypes.c_uint32, ctypes.POINTER(sz), ctypes.POINTER(sz)]
        self.get_device_memory.restype = None
        # void ggml_backend_rpc_start_server(endpoint, cache_dir, n_threads, n_devices, devices)
        self.start_server = lib.ggml_backend_rpc_start_server
        self.start_server.argtypes = [cp, cp, sz, sz, ctypes.POINTER(vp)]
        self.start_server.restype = None


@functools.lru_cache(maxsize=1)
def _lib() -> _RpcLib:
    return _RpcLib()


# ---------------------------------------------------------------- reaching workers


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise ConnectionError("connection closed")
        data += part
    return data


def probe(endpoint: Endpoint, timeout: float = DEFAULT_TIMEOUT_S) -> tuple[int, int, int]:
    """ggml-rpc's HELLO handshake under a timeout; returns the worker's protocol version.

    A worker serves one host at a time: one that is busy accepts the TCP
    connection but answers only when its current host leaves, which this
    reports as such rather than hanging, after a few connection round trips
    (at least HANDSHAKE_MIN_S) rather than the whole `timeout`.
    """
    deadline = f"within {timeout:g} s"
    start = time.monotonic()
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
    except socket.timeout:
        raise WorkerUnreachableError(f"RPC worker {endpoint}: no answer to the connection {deadline} "
                                     "(wrong host, or a firewall drops the packets)") from None
    except OSError as e:
        raise WorkerUnreachableError(f"RPC worker {endpoint}: cannot connect ({e.strerror or e}); is "
                                     f"`edge-rpc-worker --port {endpoint.port}` running there?") from None
    # An idle worker sits in accept() and answers HELLO within a round trip or two; one serving
    # another host leaves the connection in its backlog, so waiting the whole timeout tells nothing more.
    rtt = time.monotonic() - start
    window = min(timeout, max(HANDSHAKE_MIN_S, HANDSHAKE_RTTS * rtt))
    deadline = f"within {window:g} s"
    try:
        with sock:
            sock.settimeout(window)
            sock.sendall(struct.pack("<BQ", _RPC_CMD_HELLO, _CONN_CAPS) + bytes(_CONN_CAPS))
            (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
            reply = _recv_exact(sock, size)
    except socket.timeout:
        raise WorkerUnreachableError(f"RPC worker {endpoint}: connected but no handshake {deadline}; "
                                     "it is serving another host (a worker serves one at a time) or is not "
                                     "an RPC worker") from None
    except (OSError, ConnectionError) as e:
        raise WorkerUnreachableError(f"RPC worker {endpoint}: handshake failed ({e}); is it an RPC worker?") from None
    major, minor, patch = reply[0], reply[1], reply[2]
    if major != PROTO_MAJOR or size != 4 + _CONN_CAPS:
        raise WorkerUnreachableError(
            f"RPC worker {endpoint} speaks RPC protocol {major}.{minor}.{patch}, this build {PROTO_MAJOR}.x; "
            "run the same llama-cpp-python version on both machines"
        )
    return major, minor, patch


def connect(endpoints: Sequence[Endpoint], timeout: float = DEFAULT_TIMEOUT_S) -> list[Device]:
    """The devices of each worker, in order; every worker is probed before ggml sees it."""
    lib = _lib()
    for ep in endpoints:
        probe(ep, timeout)
    devices = []
    for ep in endpoints:
        reg = lib.add_server(str(ep).encode())
        n = registry().reg_dev_count(reg) if reg else 0
        if n == 0:
            raise WorkerUnreachableError(f"RPC worker {ep} offers no device")
        devices += [describe(registry().reg_dev_get(reg, i)) for i in range(n)]
    return devices


def worker_memory(endpoint: Endpoint, timeout: float = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """(free, total) bytes of a worker's first device, as ggml_backend_rpc_get_device_memory reports."""
    probe(endpoint, timeout)
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    _lib().get_device_memory(str(endpoint).encode(), 0, ctypes.byref(free), ctypes.byref(total))
    return int(free.value), int(total.value)


# ---------------------------------------------------------------- serving


def serve(endpoint: Endpoint, devices: Sequence[Device], threads: int, cache_dir: str | None) -> None:
    """Blocks serving hosts one after another (returns only if the socket cannot be bound)."""
    handles = (ctypes.c_void_p * len(devices))(*[d.handle for d in devices])
    _lib().start_server(
        str(endpoint).encode(), cache_dir.encode() if cache_dir else None, threads, len(devices), handles
    )


# ---------------------------------------------------------------- placing layers


@dataclass(frozen=True)
class SplitPlan:
    """llama_model_params values for a split: layers [0, n_layer+1-n_gpu_layers) stay on the local CPU."""

    n_gpu_layers: int
    tensor_split: tuple[float, ...]  # one share per entry of `devices`


def plan_split(n_layer: int, shares: Sequence[float], local_cpu: bool) -> SplitPlan:
    """Turn shares (local first, then one per device) into llama.cpp's n_gpu_layers + tensor_split.

    llama.cpp offloads the last n_gpu_layers of n_layer+1 (the output layer
    counts as one) and spreads them over the devices by tensor_split; the rest
    stay on the CPU. With no local GPU the local share is that CPU part.
    """
    if any(s < 0 for s in shares) or sum(shares) <= 0:
        raise RpcEndpointError(f"tensor_split needs non-negative shares with a positive sum, got {list(shares)}")
    if not local_cpu:
        return SplitPlan(-1, tuple(float(s) for s in shares))
    units = n_layer + 1
    local = round(units * shares[0] / sum(shares))
    rest = tuple(float(s) for s in shares[1:])
    if sum(rest) <= 0:
        return SplitPlan(0, rest)
    return SplitPlan(units - local, rest)


def assign_layers(n_layer: int, plan: SplitPlan, n_devices: int) -> list[int]:
    """Device of each of the n_layer+1 units (0: local CPU, i: the i-th offload device).

    Mirrors llama_model::load_tensors (llama-model.cpp): units below
    i_gpu_start stay on the CPU, the rest go to the device whose cumulative
    share first exceeds (il - i_gpu_start) / offloaded.
    """
    units = n_layer + 1
    n_gpu = units if plan.n_gpu_layers < 0 else min(plan.n_gpu_layers, units)
    start = units - n_gpu
    shares = list(plan.tensor_split[:n_devices]) or [1.0]
    total = sum(shares)
    bounds, acc = [], 0.0
    for s in shares:
        acc += s
        bounds.append(acc / total)
    out = []
    for il in range(units):
        if il < start or n_devices == 0:
            out.append(0)
            continue
        frac = (il - start) / n_gpu
        out.append(1 + min(next((i for i, b in enumerate(bounds) if b > frac), len(bounds) - 1), n_devices - 1))
    return out


_BUFFER_LINE = re.compile(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB")
_LAYER_LINE = re.compile(r"load_tensors: layer\s+\d+ assigned to device (\S+),")


def placement_from_log(lines: Iterable[str], buffer_devices: dict[str, str] | None = None) -> dict[str, tuple[int, int]]:
    """{device: (layers, weight bytes)} from llama.cpp's own load_tensors log lines.

    Layers are logged by device name ("CPU", "RPC1") but RPC buffers by the
    worker's local device index and endpoint ("RPC0[10.0.0.2:50052]"):
    `buffer_devices` maps the latter to the former.
    """
    buffer_devices = buffer_devices or {}
    out: dict[str, list[int]] = {}
    for line in lines:
        if m := _LAYER_LINE.search(line):
            out.setdefault(m.group(1), [0, 0])[0] += 1
        elif m := _BUFFER_LINE.search(line):
            name = re.sub(r"(_Mapped|_REPACK)$", "", m.group(1))
            name = buffer_devices.get(name, name)
            out.setdefault(name, [0, 0])[1] += int(float(m.group(2)) * (1 << 20))
    return {k: (v[0], v[1]) for k, v in out.items()}


# ---------------------------------------------------------------- losing a worker


_guard_lock = threading.Lock()
_guarded: set[Endpoint] = set()
_abort_callback = None  # the ctypes callback object must outlive its registration


def _gone(endpoints: Iterable[Endpoint], timeout: float = 0.5) -> list[Endpoint]:
    """Workers whose port refuses or ignores a new connection (a killed worker's port is closed)."""
    gone = []
    for ep in endpoints:
        try:
            socket.create_connection((ep.host, ep.port), timeout=timeout).close()
        except OSError:
            gone.append(ep)
    return gone


def worker_lost(reason: str) -> None:
    """Name the lost worker(s) on stderr and end the process: ggml-rpc cannot go on without them."""
    with _guard_lock:
        endpoints = sorted(_guarded, key=str)
    gone = _gone(endpoints) or endpoints
    names = ", ".join(map(str, gone)) or "unknown"
    message = (
        f"edge: lost RPC worker {names} ({reason.strip()}). llama.cpp's RPC backend cannot continue "
        f"without it and ends this process (exit code {WORKER_LOST_EXIT}); restart the worker and "
        "load the model again\n"
    )
    try:
        os.write(2, message.encode())
    finally:
        os._exit(WORKER_LOST_EXIT)


def _on_abort(message: bytes | None) -> None:
    text = (message or b"").decode("utf-8", "replace")
    if "ggml-rpc" in text or "RPC" in text:
        worker_lost(text.split(": ", 1)[-1])
    try:  # anything else: what ggml would have printed, then its abort()
        os.write(2, (text + "\n").encode())
    # catching Exception: ggml's abort callback runs inside C: nothing may propagate, and the process aborts next anyway
    except Exception:
        pass


def guard_workers(endpoints: Iterable[Endpoint]) -> None:
    """Route ggml-rpc's aborts for these workers through `worker_lost` (process-wide, idempotent)."""
    global _abort_callback
    with _guard_lock:
        _guarded.update(endpoints)
        if _abort_callback is None:
            reg = registry()
            _abort_callback = reg.abort_callback_type(_on_abort)
            reg.set_abort_callback(_abort_callback)


def unguard_workers(endpoints: Iterable[Endpoint]) -> None:
    with _guard_lock:
        _guarded.difference_update(endpoints)


class DecodeWatchdog:
    """Ends the process via `worker_lost` when one evaluation runs past `timeout_s`.

    A worker whose machine vanished (cable, power) leaves ggml's blocking recv
    waiting forever; a timeout per llama_decode bounds that wait.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._deadline: float | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="rpc-watchdog", daemon=True)
        self._closed = False
        self._thread.start()

    def __enter__(self) -> "DecodeWatchdog":
        with self._cond:
            self._deadline = time.monotonic() + self.timeout_s
            self._cond.notify()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._deadline = None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                worker_lost(f"no reply within {self.timeout_s:g} s")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m edge_llama.rpc --require`: fail set-up when the build has no RPC."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["--require"]:
        print("usage: python -m edge_llama.rpc --require", file=sys.stderr)
        return 2
    if not rpc_supported():
        print(f"error: llama-cpp-python has no RPC backend (llama_supports_rpc() is false); {REBUILD_HINT}",
              file=sys.stderr)
        return 1
    print(f"llama-cpp-python {llama_cpp.__version__}: RPC backend present")
    return 0


if __name__ == "__main__":
    sys.exit(main())
