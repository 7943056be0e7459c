"""A wrapper that reports a module's peak resident memory (edge_common.peak_rss measures it).

    python -m edge_bench.peak PEAK_FILE MODULE [ARGS...]

runs MODULE as __main__ with ARGS and writes {"peak_rss_bytes", "exit_code"}
to PEAK_FILE: how the converter benchmark measures edge-convert.
"""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

from edge_common.peak_rss import peak_rss_bytes


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
