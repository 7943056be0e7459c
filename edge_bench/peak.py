"""Peak resident memory of this process image, and a wrapper that reports it for a module.

`getrusage(RUSAGE_SELF).ru_maxrss` is wrong for a freshly started worker on
Linux: Python starts children with vfork + exec, and exec carries the
parent's high-water mark into the child's, so every worker would report at
least the parent's peak. VmHWM in /proc/self/status is the high-water mark of
the current address space only (reset by exec), so Linux reads that; other
systems fall back to getrusage.

    python -m edge_bench.peak PEAK_FILE MODULE [ARGS...]

runs MODULE as __main__ with ARGS and writes {"peak_rss_bytes", "exit_code"}
to PEAK_FILE: how the converter benchmark measures edge-convert.
"""
from __future__ import annotations

import json
import platform
import runpy
import sys
from pathlib import Path


def vmhwm_bytes(status: str) -> int | None:
    """The VmHWM line of /proc/<pid>/status text, in bytes."""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            value, unit = line.split()[1:3]
            return int(value) * {"kB": 1024, "mB": 1 << 20}.get(unit, 1024)
    return None


def peak_rss_bytes() -> int:
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        sys.stderr.write("usage: python -m edge_bench.peak PEAK_FILE MODULE [ARGS...]\n")
        return 2
    peak_file, module, args = Path(argv[0]), argv[1], argv[2:]
    sys.argv = [module, *args]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    peak_file.write_text(json.dumps({"peak_rss_bytes": peak_rss_bytes(), "exit_code": code}))
    return code


if __name__ == "__main__":
    sys.exit(main())
