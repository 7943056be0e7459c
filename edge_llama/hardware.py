"""What the host CPU is: physical cores (llama.cpp's thread count) and an identity for cached verdicts."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def parse_cpuinfo_cores(cpuinfo: str) -> int:
    """Count distinct (physical id, core id) pairs in /proc/cpuinfo text; 0 if absent."""
    cores: set[tuple[str, str]] = set()
    physical = core = None
    for line in cpuinfo.splitlines() + [""]:
        if not line.strip():
            if core is not None:
                cores.add((physical or "0", core))
            physical = core = None
            continue
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            core = value.strip()
    return len(cores)


def physical_cores() -> int:
    """Physical cores usable by this process (SMT siblings slow llama.cpp down)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = 0
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "hw.perflevel0.physicalcpu"], capture_output=True, text=True, check=False
            ).stdout.strip() or subprocess.run(
                ["sysctl", "-n", "hw.physicalcpu"], capture_output=True, text=True, check=False
            ).stdout.strip()
            cores = int(out) if out else 0
        except (OSError, ValueError):
            cores = 0
    else:
        try:
            cores = parse_cpuinfo_cores(Path("/proc/cpuinfo").read_text())
        except OSError:
            cores = 0
    if cores <= 0:
        cores = logical
    return max(1, min(cores, logical))


def cpu_identity() -> str:
    """CPU model and its matrix/vector feature flags: what a cached kernel verdict depends on."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key == "flags" and not flags:
                flags = " ".join(sorted(f for f in value.split() if f.startswith(("amx", "avx512", "avx2"))))
    except OSError:
        pass
    return f"{model} [{flags}]"
