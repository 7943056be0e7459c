"""Run `edge-serve` as a child process on a free loopback port (tests, benchmarks, examples).

Talking to a real process over a real socket is the only way to test what
clients see: the HTTP framing, SSE, disconnects, the startup and the exit.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Sequence

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`with ServerProcess(model_dir, "--parallel", "4") as server: server.url("/v1")`."""

    running: "weakref.WeakSet[ServerProcess]" = weakref.WeakSet()  # their logs go with a failing test's report

    def __init__(self, model_dir: str | Path, args: Sequence[str] = (), *, env: dict[str, str] | None = None,
                 startup_timeout_s: float = 180.0, root: Path = REPO_ROOT) -> None:
        self.root = Path(root)  # the checkout whose edge-serve runs (a benchmark's baseline may be another)
        self.model_dir = Path(model_dir)
        self.args = list(args)
        self.env = env or {}
        self.startup_timeout_s = startup_timeout_s
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="edge-serve-", suffix=".log", delete=False)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "") -> str:
        return self.base_url + path

    def start(self) -> "ServerProcess":
        self.port = free_port()
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.root), env.get("PYTHONPATH", "")) if p)
        cmd = [sys.executable, "-m", "edge_runtime.server", str(self.model_dir), "--port", str(self.port),
               "--log-level", "warning", *self.args]
        self._proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        ServerProcess.running.add(self)
        try:
            self.wait_ready()
        except BaseException:  # the exception carries the log; nothing is left behind
            self.__exit__()
            raise
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"edge-serve exited with code {self._proc.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(self.url("/health"), timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"edge-serve was not ready within {self.startup_timeout_s:g} s:\n{self.log_text()}")

    def stop(self, timeout_s: float = 15.0) -> int | None:
        proc, self._proc = self._proc, None
        ServerProcess.running.discard(self)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def log_text(self) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")[-8000:]

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._log.close()
        os.unlink(self._log.name)
