"""The engine child process: the scheduler (llama.cpp and all) behind a socket.

    python -m edge_runtime.server.engine_process CONN_FD LOG_FD LOG_LEVEL   (started by EngineHost)

A native abort in llama.cpp (GGML_ASSERT, SIGILL, the OOM killer) ends this
process, not the HTTP server; the parent then fails the requests in flight and
starts a new one. Ollama runs its llama.cpp runner as a subprocess for the same
reason. Messages are pickled over a Unix socket: the parent sends ("submit",
job fields), ("cancel", number), ("task", number, fn) (Scheduler.run_exclusive),
("stop",); this side sends ("ready", info), ("failed", message), ("events",
[(number, event), ...]) (all the events of one scheduler step in one message),
("task_done", number, ok, value) and ("stats", counters, gauges, image planner).
llama.cpp's log lines go to LOG_FD as text, so the parent can name the last one
when this process dies without a word.
"""
from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, fields
from multiprocessing.connection import Connection
from typing import Any, Callable

from edge_llama import ensure_backend

from .config import ServerOptions
from .jobs import Event, Failed, Finished, Job
from .metrics import Metrics
from .front import FAILED, LOADING, READY
from .scheduler import Scheduler

STATS_INTERVAL_S = 0.1
LLAMA_LOGGER = "edge_llama.llama_cpp"  # where edge_llama routes llama.cpp's log


@dataclass(frozen=True)
class ReadyInfo:
    """What the HTTP side needs to render prompts for the loaded model."""

    template_source: str
    bos_token: str
    eos_token: str
    marker: str
    has_vision: bool
    model_name: str
    planner: Any  # the engine's image_budget.Planner (None without vision)


def job_fields(job: Job) -> dict[str, Any]:
    """A Job's picklable fields (not its channel or its thread events)."""
    return {f.name: getattr(job, f.name) for f in fields(job) if f.name != "channel" and not f.name.startswith("_")}


class Sender:
    """Thread-safe sends to the parent; a parent that is gone ends this process's work."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, message: tuple) -> None:
        with self._lock:
            try:
                self._conn.send(message)
            except OSError:
                pass  # the parent went away; the main loop sees EOF and exits


class Outbox:
    """The events of the scheduler's current step, sent to the parent as one message when the step
    ends (`flush`, the scheduler's after-step hook): one pickle, one socket write and one wake-up of
    the HTTP process per step instead of one per token and stream, which on a small CPU take time
    from llama_decode's threads. Counters go first when an answer ends, so /metrics is current by
    the time its client reads the end."""

    def __init__(self, sender: Sender, send_stats: Callable[[], None]) -> None:
        self._sender, self._send_stats = sender, send_stats
        self._lock = threading.Lock()
        self._events: list[tuple[int, Event]] = []

    def put(self, number: int, event: Event) -> None:
        with self._lock:
            self._events.append((number, event))

    def flush(self) -> None:
        with self._lock:  # held while sending: two flushing threads cannot swap their messages
            events, self._events = self._events, []
            if not events:
                return
            if any(isinstance(event, (Finished, Failed)) for _, event in events):
                self._send_stats()
            self._sender.send(("events", events))


class RemoteChannel:
    """A job's event channel: its events go to the parent with the rest of the step's (`Outbox`)."""

    def __init__(self, outbox: Outbox, number: int) -> None:
        self._outbox, self._number = outbox, number

    def put(self, event: Event) -> None:
        self._outbox.put(self._number, event)


class StatsPump:
    def __init__(self, sender: Sender, scheduler: Scheduler, metrics: Metrics) -> None:
        self._sender, self._scheduler, self._metrics = sender, scheduler, metrics

    def send(self) -> None:
        # the image planner too: the first encode measures this device, and `auto` follows it
        self._sender.send(("stats", self._metrics.snapshot(), self._scheduler.gauges(), planner(self._scheduler)))

    def run(self) -> None:
        announced = False
        while True:
            state = self._scheduler.state
            if not announced and state == READY:
                self._sender.send(("ready", ready_info(self._scheduler)))
                announced = True
            elif state == FAILED and not announced:
                self._sender.send(("failed", self._scheduler.error or "the model failed to load"))
                return
            if state != LOADING:
                self.send()
            time.sleep(STATS_INTERVAL_S)


def planner(scheduler: Scheduler) -> Any:
    """The engine's current image planner (None without vision or before the model loaded)."""
    return scheduler.planner() if scheduler.state == READY else None


def ready_info(scheduler: Scheduler) -> ReadyInfo:
    fmt = scheduler.prompt_format
    return ReadyInfo(fmt.template.source, fmt.template.bos_token, fmt.template.eos_token, fmt.marker,
                     fmt.has_vision, fmt.model_name, planner(scheduler))


class _LineWriter(logging.Handler):
    def __init__(self, fd: int) -> None:
        super().__init__(logging.DEBUG)
        self._fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(self._fd, (record.getMessage().replace("\n", " ") + "\n").encode("utf-8", "replace"))
        except OSError:
            pass


def setup_logging(log_fd: int, level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    llama = logging.getLogger(LLAMA_LOGGER)
    llama.setLevel(logging.DEBUG)  # every line reaches the parent's memory; stderr keeps the chosen level
    llama.propagate = False
    llama.addHandler(_LineWriter(log_fd))
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setLevel(level.upper())
    to_stderr.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    llama.addHandler(to_stderr)


def serve(conn: Connection) -> int:
    kind, options = conn.recv()
    if kind != "options" or not isinstance(options, ServerOptions):
        return 2
    ensure_backend()
    sender = Sender(conn)
    metrics = Metrics()
    outbox = Outbox(sender, lambda: stats.send())
    scheduler = Scheduler(options, metrics, after_step=outbox.flush)
    stats = StatsPump(sender, scheduler, metrics)
    scheduler.start()
    threading.Thread(target=stats.run, name="edge-stats", daemon=True).start()
    jobs: dict[int, Job] = {}
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break  # the parent is gone
            if message[0] == "submit":
                spec = message[1]
                job = Job(**spec, channel=RemoteChannel(outbox, spec["number"]))  # type: ignore[arg-type]
                jobs = {n: j for n, j in jobs.items() if not j.done}
                jobs[job.number] = job
                try:
                    scheduler.submit(job)
                except Exception as exc:  # 429 / 503 from the scheduler: the job ends at once
                    from .errors import from_exception

                    job.emit(Failed(from_exception(exc)))
                    outbox.flush()
            elif message[0] == "task":
                _, number, fn = message
                try:
                    future = scheduler.run_exclusive(fn)
                # catching Exception: sent back to the HTTP side, which re-raises it in the route that asked
                except Exception as exc:
                    sender.send(("task_done", number, False, exc))
                else:
                    future.add_done_callback(functools.partial(_task_done, sender, number))
            elif message[0] == "cancel":
                job = jobs.get(message[1])
                if job is not None:
                    scheduler.cancel(job)
            elif message[0] == "stop":
                break
    finally:
        scheduler.stop()
        outbox.flush()
        stats.send()
    return 0


def _task_done(sender: Sender, number: int, future: Any) -> None:
    error = future.exception()
    sender.send(("task_done", number, error is None, future.result() if error is None else error))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    conn_fd, log_fd, level = int(args[0]), int(args[1]), args[2]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides when we stop
    setup_logging(log_fd, level)
    return serve(Connection(conn_fd))


if __name__ == "__main__":  # run the package's copy, so pickled classes name their real module
    from edge_runtime.server.engine_process import main as package_main

    sys.exit(package_main())
