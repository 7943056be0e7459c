"""The HTTP side of the engine process: start it, talk to it, restart it when it dies.

`EngineHost` offers what the routes use of a `Scheduler` (state, submit, cancel,
gauges, the prompt format) while the scheduler itself runs in a child process
(`engine_process`). When the child dies, every request it held ends with a 503
naming the signal or exit code and llama.cpp's last log line (streams get an
error event), nothing is retried behind the client's back, and a new child is
started after a backoff (1 s, doubling to 30 s; back to 1 s after a minute up).
/health says "restarting" meanwhile; /metrics counts the restarts. A child that
stays silent for `--stall-timeout` seconds once ready (`watchdog.StallWatch`) is
killed and restarted the same way, with /health saying "stalled" until the new
one is ready.
"""
from __future__ import annotations

import collections
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from concurrent.futures import Future
from typing import IO, Any, Callable

from edge_runtime.core.template import ChatTemplate
from .config import ServerOptions
from .engine_process import ReadyInfo, job_fields
from .errors import ApiError, queue_full, shutting_down
from .jobs import Failed, Job
from .metrics import Gauges, Metrics
from .prompting import PromptFormat
from .front import FAILED, LOADING, READY, STOPPED, EngineFront
from .watchdog import StallWatch

log = logging.getLogger("edge_runtime.server")

RESTARTING, STALLED = "restarting", "stalled"
BACKOFF_FIRST_S, BACKOFF_MAX_S, STABLE_AFTER_S = 1.0, 30.0, 60.0
_OWN_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
REPO_ROOT = Path(__file__).resolve().parents[2]


class EngineHost(EngineFront):
    def __init__(self, options: ServerOptions, metrics: Metrics, log_level: str = "warning") -> None:
        self.options = options
        self.metrics = metrics
        self.log_level = log_level
        self.state = LOADING
        self.error: str | None = None
        self.model_id = options.resolved_model_id()
        self.restarts = 0
        self.last_exit: str | None = None
        self._format: PromptFormat | None = None
        self._gauges = Gauges()
        self._jobs: dict[int, Job] = {}
        self._tasks: dict[int, Future] = {}  # run_exclusive calls in flight
        self._task_ids = 0
        self._planner: Any = None  # the engine's image_budget.Planner, as of its last stats message
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._conn: Connection | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._log_lines: collections.deque[str] = collections.deque(maxlen=16)  # llama.cpp's, newest last
        self._mean_job_s = 1.0
        self._thread = threading.Thread(target=self._supervise, name="edge-engine-host", daemon=True)
        self._stalled_for: float | None = None  # set when the watch killed the current child
        self._watch = StallWatch(options.stall_timeout_s, self._stalled) if options.stall_timeout_s > 0 else None

    # ------------------------------------------------------------ what the routes use

    def start(self) -> None:
        self._thread.start()
        if self._watch is not None:
            self._watch.start()

    def stop(self, timeout: float = 15.0) -> None:
        self._stopping.set()
        if self._watch is not None:
            self._watch.stop()
        self._send(("stop",))
        proc = self._proc
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._thread.join(timeout)
        self._fail_all(shutting_down())
        if self.state == READY:
            self.state = STOPPED

    def submit(self, job: Job) -> None:
        """Hand a job to the engine process, or refuse it at once (503 not ready, 429 queue full)."""
        with self._lock:
            self.require_ready()
            if self._stopping.is_set():
                raise shutting_down()
            if len(self._jobs) >= self.options.parallel + self.options.queue_size:
                self.metrics.request("rejected")
                raise queue_full(len(self._jobs) - self.options.parallel, self.options.parallel,
                                 self.options.queue_size, self._retry_after())
            self._jobs[job.number] = job
        if not self._send(("submit", job_fields(job))):
            with self._lock:
                self._jobs.pop(job.number, None)
            raise ApiError(503, "the engine process is not reachable; retry shortly", "server_error", None,
                           "engine_restarting", {"Retry-After": "2"})

    def run_exclusive(self, fn: Callable[[Any, list[Any]], Any]) -> Future:
        """`Scheduler.run_exclusive` in the engine process: `fn` (picklable: a partial of a module
        function) runs there between two decode steps; its result or exception comes back."""
        future: Future = Future()
        with self._lock:
            self.require_ready()
            self._task_ids += 1
            number = self._task_ids
            self._tasks[number] = future
        if not self._send(("task", number, fn)):
            with self._lock:
                self._tasks.pop(number, None)
            raise ApiError(503, "the engine process is not reachable; retry shortly", "server_error", None,
                           "engine_restarting", {"Retry-After": "2"})
        return future

    def plan_image(self, detail: str, share: int = 1, need: str = "") -> Any:
        """The engine's token budget for one of `share` images at `detail` whose answer has `need`
        (None until it is ready)."""
        return self._planner.plan(detail, share, need) if self._planner is not None else None

    def cancel(self, job: Job) -> None:
        if job.done:
            return
        job.cancel()
        self._send(("cancel", job.number))

    def gauges(self) -> Gauges:
        if self.state != READY:
            return Gauges(slots_total=self.options.parallel)
        return self._gauges

    # ------------------------------------------------------------ the supervisor thread

    def _supervise(self) -> None:
        delay = BACKOFF_FIRST_S
        while not self._stopping.is_set():
            started = time.monotonic()
            reason = self._run_child()
            if reason is None or self._stopping.is_set():
                return  # stopped, or the model cannot load (restarting would fail the same way)
            stalled, self._stalled_for = self._stalled_for, None
            if stalled is not None:
                reason = (f"stalled: it reported nothing for {stalled:.1f} s (--stall-timeout "
                          f"{self.options.stall_timeout_s:g}) and was killed")
            self.last_exit = reason
            self.state = STALLED if stalled is not None else RESTARTING
            self.restarts += 1
            self.metrics.add("engine_restarts")
            self.metrics.retire_remote()
            log.error("the engine process died (%s); restarting it in %.0f s", reason, delay)
            self._fail_all(ApiError(
                503, f"the engine process died ({reason}) before this request finished; the server is "
                "restarting it: retry shortly", "server_error", None, "engine_crashed", {"Retry-After": "5"}))
            if time.monotonic() - started > STABLE_AFTER_S:
                delay = BACKOFF_FIRST_S
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, BACKOFF_MAX_S)

    def _run_child(self) -> str | None:
        """Run one engine process until it ends: why it died, or None (stopped / load failure)."""
        parent_sock, child_sock = socket.socketpair()
        log_r, log_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        cmd = [sys.executable, "-m", "edge_runtime.server.engine_process", str(child_sock.fileno()), str(log_w),
               self.log_level]
        self._proc = proc = subprocess.Popen(cmd, pass_fds=(child_sock.fileno(), log_w), env=env,
                                             stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        child_sock.close()
        os.close(log_w)
        readers = [threading.Thread(target=self._read_log, args=(os.fdopen(log_r, "rb"),), daemon=True),
                   threading.Thread(target=self._read_stderr, args=(proc.stderr,), daemon=True)]
        for reader in readers:
            reader.start()
        self._conn = conn = Connection(parent_sock.detach())
        self._send(("options", self.options))
        load_failed = False
        try:
            while True:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    break
                if self._watch is not None:
                    self._watch.beat()
                try:
                    load_failed = self._handle(message) or load_failed
                except Exception:  # a message this side cannot read: stop that child, start a new one
                    log.exception("bad message from the engine process; stopping it")
                    proc.kill()
                    break
        finally:
            if self._watch is not None:
                self._watch.disarm()
            self._conn = None
            conn.close()
        code = proc.wait()
        for reader in readers:
            reader.join(2.0)
        if self._stopping.is_set() or load_failed:
            return None
        return describe_exit(code, self._log_lines[-1] if self._log_lines else None)

    def _handle(self, message: tuple) -> bool:
        kind = message[0]
        if kind == "events":  # one scheduler step's, in the order they were sent
            with self._lock:
                for number, event in message[1]:
                    job = self._jobs.get(number)
                    if job is not None:
                        job.emit(event)
                        if job.done:  # its last choice finished, or it failed
                            del self._jobs[number]
                            self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * (time.monotonic() - job.submitted)
        elif kind == "task_done":
            _, number, ok, value = message
            with self._lock:
                future = self._tasks.pop(number, None)
            if future is not None and future.set_running_or_notify_cancel():
                future.set_result(value) if ok else future.set_exception(value)
        elif kind == "stats":
            _, counters, gauges, planner = message
            self.metrics.set_remote(counters)
            self._gauges = gauges
            if planner is not None:
                self._planner = planner
        elif kind == "ready":
            info: ReadyInfo = message[1]
            template = ChatTemplate(info.template_source, bos_token=info.bos_token, eos_token=info.eos_token)
            self._format = PromptFormat(template, info.marker, info.has_vision, info.model_name)
            self._planner = info.planner
            self.state = READY
            if self._watch is not None:
                self._watch.arm()
            log.info("engine process %d ready%s", self._proc.pid if self._proc else 0,
                     f" (restart {self.restarts})" if self.restarts else "")
        elif kind == "failed":
            self.error = message[1]
            self.state = FAILED
            log.error("loading the model failed: %s", self.error)
            return True
        return False

    def _stalled(self, silent_s: float) -> None:
        """The watch's verdict: fail what the child held (503 engine_stalled), then kill it; the
        supervisor sees it end and starts a new one."""
        proc = self._proc
        if proc is None or self._stopping.is_set() or self.state != READY:
            return
        self._stalled_for = silent_s
        self.state = STALLED
        self.last_exit = f"stalled: it reported nothing for {silent_s:.1f} s"
        log.error("the engine process %d reported nothing for %.1f s (--stall-timeout %g); restarting it",
                  proc.pid, silent_s, self.options.stall_timeout_s)
        self._fail_all(ApiError(
            503, f"the engine process stopped making progress (nothing reported for {silent_s:.0f} s, "
            f"--stall-timeout {self.options.stall_timeout_s:g}) before this request finished; the server is "
            "restarting it: retry shortly", "server_error", None, "engine_stalled", {"Retry-After": "5"}))
        proc.kill()  # SIGKILL ends a stopped process too

    def _send(self, message: tuple) -> bool:
        conn = self._conn
        if conn is None:
            return False
        with self._send_lock:
            try:
                conn.send(message)
                return True
            except (OSError, ValueError):
                return False

    def _fail_all(self, error: ApiError) -> None:
        with self._lock:
            jobs, self._jobs = list(self._jobs.values()), {}
            tasks, self._tasks = list(self._tasks.values()), {}
        for future in tasks:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
        for job in jobs:
            if not job.done:
                self.metrics.request("error")
                job.emit(Failed(error))

    def _read_log(self, stream: IO[bytes]) -> None:
        with stream:
            for raw in stream:
                line = raw.decode("utf-8", "replace").strip()
                if line:
                    self._log_lines.append(line)

    def _read_stderr(self, stream: IO[bytes] | None) -> None:
        """Pass the child's stderr through; lines not from Python logging are native (ggml aborts)."""
        if stream is None:
            return
        with stream:
            for raw in stream:
                sys.stderr.buffer.write(raw)
                sys.stderr.flush()
                line = raw.decode("utf-8", "replace").strip()
                if line and not _OWN_LOG_LINE.match(line) and not line.startswith(("Traceback", "File ")):
                    self._log_lines.append(line)

    def _retry_after(self) -> int:
        waiting = max(0, len(self._jobs) - self.options.parallel) + 1
        return max(1, min(60, math.ceil(self._mean_job_s * waiting / self.options.parallel)))


def describe_exit(code: int, last_line: str | None) -> str:
    """'killed by signal 9 (SIGKILL); last llama.cpp log line: ...' for a child's return code."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown"
        what = f"killed by signal {-code} ({name})"
    else:
        what = f"exited with code {code}"
    return what + (f"; last llama.cpp log line: {last_line!r}" if last_line else "")

