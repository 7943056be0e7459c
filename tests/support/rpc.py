"""Start and stop real edge-rpc-worker processes on loopback for the RPC tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from edge_llama.rpc import Endpoint, WorkerUnreachableError, probe

from .server import free_port

REPO = Path(__file__).resolve().parents[2]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


class Worker:
    """One `edge-rpc-worker --port P --threads 1` child, ready when its handshake answers."""

    def __init__(self, *extra: str) -> None:
        self.port = free_port()
        self.endpoint = Endpoint("127.0.0.1", self.port)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_runtime.cli.rpc_worker", "--port", str(self.port), "--threads", "1", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
        )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                probe(self.endpoint, timeout=2)
                return
            except WorkerUnreachableError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise
                time.sleep(0.2)

    def __str__(self) -> str:
        return str(self.endpoint)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> tuple[int, str, str]:
        """Send `sig`, wait, return (exit code, stdout, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=20)
