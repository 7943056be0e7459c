"""One measured party, one subprocess: the protocol between the bench and its workers.

Peak RSS is a per-process high-water mark, so each configuration of each
party (the runtime or a baseline) runs in a fresh interpreter: its
`getrusage` peak is that configuration's alone, and nothing one party loaded
(torch, another model) inflates another. The parent writes a `WorkerSpec` as
JSON to the worker's stdin; the worker prints exactly one JSON object (a
`WorkerResult`) on stdout. llama.cpp and libraries that print to stdout are
redirected to stderr first, so that object is never corrupted.

    python -m edge_bench.workers < spec.json
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .options import ACCURACY, CHAT_HANDLER, MEMORY, RAW, RUNTIME, TRANSFORMERS, Config, Measure, measure_from_dict

# kind -> module with `measure(spec, rec)`; imported in the worker only, so the
# runtime's worker never loads torch and the parent never loads a model.
MEASURERS = {
    RUNTIME: "edge_bench.runtime_worker",
    RAW: "edge_bench.raw_worker",
    CHAT_HANDLER: "edge_bench.handler_worker",
    TRANSFORMERS: "edge_bench.transformers_worker",
    MEMORY: "edge_bench.memory_worker",
    ACCURACY: "edge_bench.accuracy_worker",
}
_STDERR_TAIL = 2000
SELF_SIGNAL_ENV = "EDGE_BENCH_WORKER_SELF_SIGNAL"  # test hook, e.g. SIGILL


@dataclass(frozen=True)
class WorkerSpec:
    kind: str
    config: Config
    measure: Measure
    text_path: str | None = None
    mmproj_path: str | None = None
    hf_dir: str | None = None  # the transformers baseline's checkpoint
    variant: dict[str, Any] | None = None  # kind-specific settings (memory breakdown, accuracy reference)

    def __post_init__(self) -> None:
        if self.kind not in MEASURERS:
            # a plain ValueError: kinds come from edge-bench's own table: a programming error
            raise ValueError(f"unknown worker kind {self.kind!r}; known: {', '.join(MEASURERS)}")

    def to_json(self) -> str:
        from dataclasses import asdict

        return json.dumps({"kind": self.kind, "config": self.config.to_dict(), "measure": asdict(self.measure),
                           "text_path": self.text_path, "mmproj_path": self.mmproj_path, "hf_dir": self.hf_dir,
                           "variant": self.variant})

    @classmethod
    def from_json(cls, text: str) -> "WorkerSpec":
        d = json.loads(text)
        return cls(d["kind"], Config.from_dict(d["config"]), measure_from_dict(d["measure"]),
                   d.get("text_path"), d.get("mmproj_path"), d.get("hf_dir"), d.get("variant"))


@dataclass
class Recorder:
    """What a worker measured: `samples` repeat per round, `values` are single facts."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    values: dict[str, float | int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    recording: bool = True  # False during warm-up rounds

    def sample(self, name: str, value: float) -> None:
        if self.recording:
            self.samples.setdefault(name, []).append(float(value))

    def value(self, name: str, value: float | int) -> None:
        self.values[name] = value

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def time_loads(self, measure: Measure, open_session: Callable[[], Any]) -> None:
        """load_s per round: open a session (model, context, projector) and close it again."""
        for _ in self.rounds(measure):
            t0 = time.perf_counter()
            session = open_session()
            self.sample("load_s", time.perf_counter() - t0)
            session.close()

    def rounds(self, measure: Measure):
        """Warm-up rounds (not recorded), then measured ones; yields the round index."""
        for i in range(measure.warmup + measure.repeats):
            self.recording = i >= measure.warmup
            yield i
        self.recording = True


@dataclass
class WorkerResult:
    kind: str
    config: Config
    samples: dict[str, list[float]]
    values: dict[str, float | int]
    notes: list[str]
    peak_rss_bytes: int
    wall_s: float
    error: str | None = None
    variant: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": self.config.to_dict(), "samples": self.samples, "values": self.values,
                "notes": self.notes, "peak_rss_bytes": self.peak_rss_bytes, "wall_s": self.wall_s, "error": self.error,
                "variant": self.variant}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WorkerResult":
        return cls(d["kind"], Config.from_dict(d["config"]), d.get("samples", {}), d.get("values", {}),
                   d.get("notes", []), int(d.get("peak_rss_bytes", 0)), float(d.get("wall_s", 0.0)), d.get("error"),
                   d.get("variant"))

    @classmethod
    def failed(cls, spec: WorkerSpec, error: str, wall_s: float = 0.0) -> "WorkerResult":
        return cls(spec.kind, spec.config, {}, {}, [], 0, wall_s, error, spec.variant)


# ---------------------------------------------------------------- parent side


def worker_env() -> dict[str, str]:
    """The parent's environment, plus: this package importable, no gdb backtraces on ggml aborts."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("GGML_NO_BACKTRACE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_worker(spec: WorkerSpec, timeout_s: float = 3600.0) -> WorkerResult:
    """Run one worker to completion; a crash or timeout becomes a result with `error` set."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "edge_bench.workers"]
    try:
        proc = subprocess.run(cmd, input=spec.to_json(), capture_output=True, text=True, env=worker_env(),
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return WorkerResult.failed(spec, f"timed out after {timeout_s:.0f} s", time.perf_counter() - t0)
    return parse_output(spec, proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0)


def parse_output(spec: WorkerSpec, returncode: int, stdout: str, stderr: str, wall_s: float) -> WorkerResult:
    text = stdout.strip()
    if text:
        try:
            result = WorkerResult.from_dict(json.loads(text))
            result.wall_s = wall_s
            return result
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            return WorkerResult.failed(spec, f"unreadable worker output ({exc}): {text[:200]!r}", wall_s)
    from edge_llama.crash import describe_exit

    tail = stderr.strip()[-_STDERR_TAIL:]
    return WorkerResult.failed(spec, f"worker {spec.kind} crashed without a result, {describe_exit(returncode)}"
                               + (f"; its stderr ends: {tail}" if tail else ""), wall_s)


# ---------------------------------------------------------------- worker side


def measurer(kind: str) -> Callable[[WorkerSpec, Recorder], None]:
    return importlib.import_module(MEASURERS[kind]).measure


def _protect_stdout() -> int:
    """Point fd 1 at stderr and return a private copy of the real stdout."""
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    return real


def main() -> int:
    from edge_common.peak_rss import peak_rss_bytes

    out = _protect_stdout()
    t0 = time.perf_counter()
    spec = WorkerSpec.from_json(sys.stdin.read())
    hook = os.environ.get(SELF_SIGNAL_ENV)  # test hook: die as a faulting llama.cpp kernel kills the process
    if hook:
        import signal

        os.kill(os.getpid(), getattr(signal, hook))
    rec = Recorder()
    error = None
    try:
        measurer(spec.kind)(spec, rec)
    except Exception as exc:  # reported to the parent, which carries on with other configurations
        traceback.print_exc()
        error = f"{type(exc).__name__}: {exc}"
    result = WorkerResult(spec.kind, spec.config, rec.samples, rec.values, rec.notes, peak_rss_bytes(),
                          time.perf_counter() - t0, error, spec.variant)
    os.write(out, (json.dumps(result.to_dict()) + "\n").encode())
    os.close(out)
    return 0 if error is None else 1


if __name__ == "__main__":
    sys.exit(main())
