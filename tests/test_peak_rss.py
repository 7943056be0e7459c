"""Peak RSS belongs to the process that reports it: a child started by exec does not inherit its parent's."""
from __future__ import annotations

import subprocess
import sys

import numpy as np

from edge_common.peak_rss import peak_rss_bytes, vmhwm_bytes

BALLAST = 384 << 20  # far above a bare interpreter (~10-40 MB), far below this machine's memory


def test_vmhwm_line_in_bytes():
    """/proc/<pid>/status's units (proc(5)): kB is KiB."""
    assert vmhwm_bytes("Name:\tpython\nVmPeak:\t 9000 kB\nVmHWM:\t  2048 kB\nVmRSS:\t 1024 kB\n") == 2048 * 1024
    assert vmhwm_bytes("Name:\tpython\n") is None


def test_a_started_child_reports_its_own_peak():
    """getrusage's ru_maxrss carries over exec on Linux: the child would report >= the parent's ballast."""
    ballast = np.ones(BALLAST, dtype=np.uint8)  # touched: resident, not just reserved
    parent = peak_rss_bytes()
    child = int(subprocess.run([sys.executable, "-c", "from edge_common.peak_rss import peak_rss_bytes as p; print(p())"],
                               capture_output=True, text=True, check=True).stdout)
    del ballast
    assert parent >= BALLAST
    assert 0 < child < BALLAST // 2, (parent, child)
