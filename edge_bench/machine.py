"""What machine the numbers came from: CPU, cores, RAM, backend, library builds.

A benchmark table without its machine is unreadable, so the JSON carries this
and the markdown prints it first. Only standard-library probes and llama.cpp's
own system info: nothing here needs extra packages.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class MachineInfo:
    cpu_model: str
    physical_cores: int
    logical_cores: int
    ram_bytes: int
    os: str
    python: str
    backend: str  # "CPU" or the GPU backend llama.cpp was built with
    gpu_offload: bool
    llama_cpp_python: str
    llama_cpp_system_info: str
    packages: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def one_line(self) -> str:
        return (f"{self.cpu_model}, {self.physical_cores} cores ({self.logical_cores} threads), "
                f"{self.ram_bytes / 2**30:.1f} GiB RAM, {self.os}, backend {self.backend}, "
                f"llama-cpp-python {self.llama_cpp_python}")


def cpu_model_from_cpuinfo(text: str) -> str | None:
    """The 'model name' (x86) or 'Model'/'Hardware' (ARM boards) line of /proc/cpuinfo."""
    for key in ("model name", "Model", "Hardware", "cpu model"):
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key and value.strip():
                return value.strip()
    return None


def cpu_model() -> str:
    if platform.system() == "Darwin":
        out = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
        if out:
            return out
    try:
        found = cpu_model_from_cpuinfo(Path("/proc/cpuinfo").read_text())
        if found:
            return found
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        out = _run(["sysctl", "-n", "hw.memsize"])
        return int(out) if out and out.isdigit() else 0


def backend_name(system_info: str, gpu_offload: bool) -> str:
    """The first non-CPU backend named in llama.cpp's system info, else CPU."""
    if gpu_offload:
        for name in ("CUDA", "Metal", "Vulkan", "ROCm", "HIP", "SYCL", "OpenCL", "CANN", "MUSA"):
            if name.lower() in system_info.lower():
                return name
        return "GPU"
    return "CPU"


PACKAGES = ("numpy", "torch", "transformers", "gguf", "matplotlib")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def detect() -> MachineInfo:
    from edge_llama import system_info

    from edge_llama import ensure_backend, physical_cores
    from edge_llama.offload import gpu_offload_available

    ensure_backend()
    version, info = system_info()
    gpu = gpu_offload_available()  # a local GPU (an RPC-capable build alone is not one)
    return MachineInfo(
        cpu_model=cpu_model(),
        physical_cores=physical_cores(),
        logical_cores=os.cpu_count() or 1,
        ram_bytes=ram_bytes(),
        os=f"{platform.system()} {platform.release()} {platform.machine()}",
        python=sys.version.split()[0],
        backend=backend_name(info, gpu),
        gpu_offload=gpu,
        llama_cpp_python=version,
        llama_cpp_system_info=info,
        packages=package_versions(),
    )


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
