"""Peak resident memory of this process image: what benchmarks and GenerationStats report.

`getrusage(RUSAGE_SELF).ru_maxrss` is wrong for a freshly started process on
Linux: Python starts children with vfork + exec, and exec carries the parent's
high-water mark into the child's, so a worker, the server's engine child or
edge-convert under a benchmark would report at least its parent's peak. VmHWM
in /proc/self/status is the high-water mark of the current address space only
(reset by exec), so Linux reads that; macOS (and any system without /proc)
falls back to getrusage, whose unit is bytes there and KiB on Linux.
"""
from __future__ import annotations

import platform
from pathlib import Path

_UNITS = {"kB": 1024, "mB": 1 << 20}


def vmhwm_bytes(status: str) -> int | None:
    """The VmHWM line of /proc/<pid>/status text, in bytes; None when the text has none."""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            value, unit = line.split()[1:3]
            return int(value) * _UNITS.get(unit, 1024)
    return None


def peak_rss_bytes() -> int:
    """This process image's peak resident set in bytes; 0 where the system reports nothing (Windows)."""
    try:
        found = vmhwm_bytes(Path("/proc/self/status").read_text())
        if found:
            return found
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if platform.system() == "Darwin" else peak * 1024)
