"""What the host CPU is: physical cores (llama.cpp's thread count) and an identity for cached verdicts."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def cpuinfo_cores(cpuinfo: str) -> dict[int, tuple[str, str]]:
    """processor -> (physical id, core id) from /proc/cpuinfo text; empty where it has no core ids (ARM)."""
    cores: dict[int, tuple[str, str]] = {}
    processor = physical = core = None
    for line in cpuinfo.splitlines() + [""]:
        if not line.strip():
            if core is not None:
                cores[processor if processor is not None else len(cores)] = (physical or "0", core)
            processor = physical = core = None
            continue
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "processor" and value.isdigit():
            processor = int(value)
        elif key == "physical id":
            physical = value
        elif key == "core id":
            core = value
    return cores


def parse_cpuinfo_cores(cpuinfo: str) -> int:
    """Count distinct (physical id, core id) pairs in /proc/cpuinfo text; 0 if absent."""
    return len(set(cpuinfo_cores(cpuinfo).values()))


def cpuinfo_processors(cpuinfo: str) -> list[int]:
    """The logical CPU numbers /proc/cpuinfo lists ("processor : N" lines)."""
    out = []
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "processor" and value.strip().isdigit():
            out.append(int(value))
    return out


def cpu_capacities(sys_cpu: Path) -> dict[int, int]:
    """cpuN -> /sys/devices/system/cpu/cpuN/cpu_capacity (ARM's relative core speed, 1024 = fastest);
    empty where the kernel has none (x86)."""
    caps = {}
    for f in sys_cpu.glob("cpu[0-9]*/cpu_capacity"):
        try:
            caps[int(f.parent.name[3:])] = int(f.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return caps


def count_cores(cpuinfo: str, capacities: dict[int, int], allowed: set[int]) -> int:
    """Cores llama.cpp should run a thread on, among the logical CPUs `allowed`; 0 if unknown.

    x86 lists (physical id, core id) per logical CPU: SMT siblings share a core and slow
    llama.cpp down. ARM's /proc/cpuinfo has no such lines and no SMT: one core per
    processor. On big.LITTLE boards (RK3588: 4x A55 at capacity 414 + 4x A76 at 1024)
    llama.cpp splits each matmul evenly over its threads, so the big cores would wait on
    the little ones: only the cores of the highest capacity count (macOS's
    hw.perflevel0.physicalcpu makes the same choice for Apple's performance cores).
    """
    if capacities and len({capacities.get(c) for c in allowed if c in capacities}) > 1:
        top = max(capacities[c] for c in allowed if c in capacities)
        allowed = {c for c in allowed if capacities.get(c) == top}
    smt = cpuinfo_cores(cpuinfo)
    if smt:
        return len({core for cpu, core in smt.items() if not allowed or cpu in allowed})
    processors = set(cpuinfo_processors(cpuinfo))
    return len(processors & allowed) if allowed else len(processors)


def physical_cores(root: Path = Path("/")) -> int:
    """Cores usable by this process that llama.cpp should thread over (see count_cores).

    `root` is the file-system root to read /proc/cpuinfo and /sys from: tests pass a folder of
    a real board's files; for one, every CPU it lists is usable.
    """
    host = root == Path("/")
    if host and hasattr(os, "sched_getaffinity"):
        allowed = set(os.sched_getaffinity(0))
    else:
        allowed = set()
    logical = len(allowed) if allowed else (os.cpu_count() or 1)
    cores = 0
    if host and platform.system() == "Darwin":
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
            cpuinfo = (root / "proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
        if not host:
            allowed = set(cpuinfo_processors(cpuinfo))
            logical = len(allowed) or 1
        cores = count_cores(cpuinfo, cpu_capacities(root / "sys/devices/system/cpu"), allowed)
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


# Projector types by encode speed where they keep every token's embedding (cosine >= 0.999 to the
# float projector): edge-bench --images on a 2-core Zen 4 measured bf16 5.1 s (cosine 1.0), q6_k
# 4.2-4.9 s (0.9993), q8_0 6.1-7.5 s at 300 tokens; q5_k / q4_k are faster but lose the image.
CPU_PROJECTOR_TYPE = "q6_k"


def cpu_flags(cpuinfo: str) -> set[str]:
    """The first processor's feature flags (x86 `flags`, ARM `Features`) in /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def fastest_projector_type(cpuinfo: str, gpu: bool) -> tuple[str, str]:
    """(projector type, why) that encodes fastest here while keeping the image: bf16 on a GPU backend or a
    CPU with AVX-512 BF16 (native bf16 dot products, cosine 1.0), else the K-quant q6_k."""
    if gpu:
        return "bf16", "the projector runs on a GPU backend"
    if "avx512_bf16" in cpu_flags(cpuinfo):
        return "bf16", "this CPU has AVX-512 BF16"
    return CPU_PROJECTOR_TYPE, "no bf16 dot products here: the fastest K-quant that keeps cosine >= 0.999"


def this_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
