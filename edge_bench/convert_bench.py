"""`edge-bench --convert`: wall time and peak RSS of edge-convert itself.

Each conversion runs as its own process under `edge_bench.peak`,
which reports that process's own high-water mark, so the figure is the
converter's, not ours (and the converter's own subprocesses, if any, are not
in it). The output goes to a scratch directory that is removed afterwards.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .workers import worker_env

@dataclass(frozen=True)
class ProcessRun:
    returncode: int
    wall_s: float
    peak_rss_bytes: int
    stderr: str


@dataclass(frozen=True)
class ConvertRun:
    target: str
    how: str
    wall_s: float
    peak_rss_bytes: int
    output_bytes: int
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def run_measured(module: str, args: list[str], timeout_s: float = 7200.0) -> ProcessRun:
    """Run `python -m module args` under the peak wrapper: exit code, wall time, its own peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak.json"
        cmd = [sys.executable, "-m", "edge_bench.peak", str(peak_file), module, *args]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  env=worker_env(), timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return ProcessRun(-1, time.perf_counter() - t0, 0, f"timed out after {timeout_s:.0f} s")
        wall = time.perf_counter() - t0
        peak = json.loads(peak_file.read_text())["peak_rss_bytes"] if peak_file.is_file() else 0
        return ProcessRun(proc.returncode, wall, peak, proc.stderr[-2000:])


def convert_args(ckpt: Path, out: Path, quant: str) -> list[str]:
    return [str(ckpt), "-o", str(out), "--quant", quant, "--overwrite", "-q"]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.gguf"))


def bench_convert(ckpt: str | Path, target: str, work_dir: str | Path) -> ConvertRun:
    """Convert `ckpt` to `target` in a scratch directory under work_dir, which is removed afterwards."""
    ckpt = Path(ckpt)
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"convert-{target}-", dir=work_dir))
    try:
        run = run_measured("edge_app.cli", convert_args(ckpt, scratch, target))
        how = f"edge-convert --quant {target}"
        if run.returncode == 0:
            return ConvertRun(target, how, run.wall_s, run.peak_rss_bytes, dir_bytes(scratch))
        return ConvertRun(target, how, run.wall_s, run.peak_rss_bytes, 0, _last_line(run.stderr))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "failed without a message"

