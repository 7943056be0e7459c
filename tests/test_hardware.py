"""Host facts on ARM boards: the core count llama.cpp threads over, read from real boards' files."""
from __future__ import annotations

from pathlib import Path

import pytest

from edge_llama.hardware import physical_cores

BOARDS = Path(__file__).parent / "data" / "boards"

# From each board's specification (tests/data/boards/README.md), not from the code.
EXPECTED_CORES = {
    "raspberry-pi-5": 4,  # 4x Cortex-A76, no SMT, no "core id" lines
    "jetson-orin-nano": 6,  # 6x Cortex-A78AE
    "rk3588": 4,  # 4x A76 (capacity 1024) used, 4x A55 (414) left out
}


@pytest.mark.parametrize("board", sorted(EXPECTED_CORES))
def test_physical_cores_on_real_arm_boards(board):
    assert (BOARDS / board / "proc" / "cpuinfo").read_text().count("core id") == 0  # ARM's cpuinfo has none
    assert physical_cores(BOARDS / board) == EXPECTED_CORES[board]


def test_every_board_folder_has_an_expected_count():
    assert sorted(p.name for p in BOARDS.iterdir() if p.is_dir()) == sorted(EXPECTED_CORES)


def test_big_little_keeps_the_big_cores_even_when_the_little_ones_are_listed_last(tmp_path):
    """The big cluster is found by capacity, not by position: a board whose big cores come first."""
    src = (BOARDS / "rk3588" / "proc" / "cpuinfo").read_text()
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "cpuinfo").write_text(src)
    for cpu, cap in enumerate([1024] * 2 + [414] * 6):
        d = tmp_path / "sys" / "devices" / "system" / "cpu" / f"cpu{cpu}"
        d.mkdir(parents=True)
        (d / "cpu_capacity").write_text(f"{cap}\n")
    assert physical_cores(tmp_path) == 2


def test_no_amx_buffer_type_means_no_amx_probe():
    """ARM builds have no AMX buffer type (only CPU_REPACK): the AMX probe, a child process that
    loads a model, must not run there, nor on x86 CPUs without AMX."""
    import platform

    from edge_llama import amx, bufts

    names = tuple(b.name for b in bufts.cpu_extra_buffer_types())
    if platform.machine().lower() in ("aarch64", "arm64"):
        assert names == (bufts.CPU_REPACK,)

    def no_probe(mode):
        raise AssertionError(f"the {mode} probe ran")

    plan = amx.extra_bufts_plan(True, "auto", available=tuple(n for n in names if n != bufts.AMX), probe=no_probe)
    assert plan.use_extra_bufts and plan.repack_overrides is None and "AMX" not in plan.how.replace("no AMX", "")
