"""Whether llama.cpp's AMX buffer type may hold the weights on this machine.

llama.cpp puts quantized matmul weights in its AMX buffer type whenever the
CPU advertises AMX. On some hosts (AWS c7i, Xeon 6, VMs) its AMX kernels load
an invalid tile configuration and request the tile-data permission on the
main thread only (ggml-org/llama.cpp PR #26954): the process dies by SIGILL
at the first matmul, with no Python error. So AMX is used only where a probe
in a child process -- a tiny quantized model through this same llama.cpp
build, extra buffer types on, a prefill and a few decode steps on 2+ threads
-- ran to the end. The verdict is cached per library build and CPU. Where
AMX fails, CPU repacking is kept by pointing the repackable weights at the
CPU_REPACK buffer type (tensor_buft_overrides) with the other extra buffer
types off; if even that fails, extra buffer types are turned off.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from . import bufts
from .amx_setting import AMX_ENV
from .crash import describe_exit
from .hardware import cpu_identity

log = logging.getLogger("edge_llama")

PROBE_TIMEOUT_S = 180.0
CACHE_ENV = "EDGE_CACHE_DIR"
CACHE_FILE = "llama-extra-bufts.json"
# Test hook: the probe child kills itself with this signal before probing, so the real
# process/signal handling runs on machines whose AMX works (or that have none).
PROBE_SELF_SIGNAL_ENV = "EDGE_LLAMA_PROBE_SELF_SIGNAL"


@dataclass(frozen=True)
class ExtraBufts:
    """How weights use llama.cpp's CPU extra buffer types for one load."""

    use_extra_bufts: bool
    repack_overrides: int | None  # CPU_REPACK handle for tensor_buft_overrides, with use_extra_bufts off
    how: str


@dataclass(frozen=True)
class Verdict:
    ok: bool
    detail: str


def cache_dir() -> Path:
    """$EDGE_CACHE_DIR, else $XDG_CACHE_HOME/qwen3-vl-edge, else ~/.cache/qwen3-vl-edge."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qwen3-vl-edge"


def machine_key() -> str:
    """Library build (name, size, mtime of each llama.cpp/ggml library) + CPU identity."""
    h = hashlib.sha256(cpu_identity().encode())
    lib = bufts.lib_dir()
    for p in sorted(lib.glob("lib*.so*")) + sorted(lib.glob("*.dylib")) + sorted(lib.glob("*.dll")):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, data: dict) -> None:
    """Temp file then rename: a reader never sees half a file. A read-only home only costs a re-probe."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".tmp-", delete=False) as f:
            json.dump(data, f, indent=1)
        os.replace(f.name, path)
    except OSError as exc:
        log.debug("could not cache the probe verdict in %s: %s", path, exc)


def run_probe(mode: str, timeout_s: float = PROBE_TIMEOUT_S) -> Verdict:
    """Run `python -m edge_llama.probe MODE` in a child; its exit says whether MODE works here."""
    cmd = [sys.executable, "-m", "edge_llama.probe", mode]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("GGML_NO_BACKTRACE", "1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return Verdict(False, f"the {mode} probe timed out after {timeout_s:.0f} s")
    if proc.returncode == 0:
        return Verdict(True, proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "ok")
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return Verdict(False, f"the {mode} probe was {describe_exit(proc.returncode)}" + (f" [{tail}]" if tail else ""))


_lock = threading.Lock()


def verdict(mode: str, *, probe=run_probe) -> Verdict:
    """The cached verdict for MODE ("amx" or "repack") on this library build and CPU; probes once."""
    with _lock:
        path = cache_dir() / CACHE_FILE
        key = f"{machine_key()}:{mode}"
        entry = _read_cache(path).get(key)
        if isinstance(entry, dict) and isinstance(entry.get("ok"), bool):
            return Verdict(entry["ok"], str(entry.get("detail", "")))
        log.info("probing llama.cpp's %s buffer types in a child process (once per build and CPU)", mode)
        result = probe(mode)
        data = _read_cache(path)
        data[key] = {**asdict(result), "cpu": cpu_identity()}
        _write_cache(path, data)
        return result


def extra_bufts_plan(repack: bool, amx: str, *, available: tuple[str, ...] | None = None,
                     probe=run_probe) -> ExtraBufts:
    """Decide for one load; `amx` is resolved ("auto", "on", "off"), `available` the extra buffer type names."""
    if not repack:
        return ExtraBufts(False, None, "no extra buffer types (repack off)")
    names = available if available is not None else tuple(b.name for b in bufts.cpu_extra_buffer_types())
    if bufts.AMX not in names:
        what = "CPU repack" if bufts.CPU_REPACK in names else "no extra buffer types in this build"
        return ExtraBufts(True, None, what + (" (no AMX on this CPU)" if bufts.CPU_REPACK in names else ""))
    if amx == "on":
        return ExtraBufts(True, None, f"AMX + CPU repack (forced: amx=True or {AMX_ENV}=on)")
    if amx == "off":
        reason = f"AMX off by setting (amx=False or {AMX_ENV}=off)"
    else:
        v = verdict("amx", probe=probe)
        if v.ok:
            return ExtraBufts(True, None, "AMX + CPU repack (AMX probe passed on this CPU)")
        reason = f"AMX not used: {v.detail}"
    repack_buft = bufts.find(bufts.CPU_REPACK)
    if repack_buft is not None:
        v = verdict("repack", probe=probe)
        if v.ok:
            return ExtraBufts(False, repack_buft.handle, f"CPU_REPACK without AMX; {reason}")
        reason += f"; CPU_REPACK without AMX failed too: {v.detail}"
    return ExtraBufts(False, None, f"no extra buffer types; {reason}")
