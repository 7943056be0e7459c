"""`edge-convert --mmproj-quant auto` and the runtime's hint pick the projector type that encodes fastest
on the device while keeping the image: bf16 with native bf16 dot products (a GPU backend, AVX-512 BF16),
else q6_k. Expected types come from the CPU's flags as `lscpu` and the boards' cpuinfo files give them."""
from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_llama.hardware import fastest_projector_type

BOARDS = Path(__file__).parent / "data" / "boards"


def host_has_avx512_bf16() -> bool:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags:")), [])
    return "avx512_bf16" in flags


@pytest.mark.parametrize("board", ["raspberry-pi-5", "jetson-orin-nano", "rk3588"])
def test_arm_boards_without_bf16_get_q6_k(board):
    cpuinfo = (BOARDS / board / "proc" / "cpuinfo").read_text()
    assert fastest_projector_type(cpuinfo, gpu=False)[0] == "q6_k"
    assert fastest_projector_type(cpuinfo, gpu=True)[0] == "bf16"  # the Orin's GPU: bf16 tensor cores


def test_x86_flags_decide():
    zen4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
    skylake = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
    assert fastest_projector_type(zen4, gpu=False) == ("bf16", "this CPU has AVX-512 BF16")
    assert fastest_projector_type(skylake, gpu=False)[0] == "q6_k"
    assert fastest_projector_type("", gpu=False)[0] == "q6_k"


@pytest.mark.torch
def test_edge_convert_mmproj_quant_auto_picks_for_this_machine(tiny_model_dir, tmp_path):
    from edge_app.cli import main

    expected = "bf16" if host_has_avx512_bf16() else "q6_k"
    out = tmp_path / "out"
    res = CliRunner().invoke(main, [str(tiny_model_dir), "-o", str(out), "--mmproj-quant", "auto", "-q"])
    assert res.exit_code == 0, res.output
    assert f"--mmproj-quant auto: {expected}" in res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mmproj"]["type"] == expected


def test_the_runtime_says_when_another_projector_would_be_faster(tiny_f16_dir, caplog):
    """The f16 test projector is not the fastest type on any device: loading it says which would be."""
    from edge_runtime import VisionChat

    expected = "bf16" if host_has_avx512_bf16() else "q6_k"
    with caplog.at_level(logging.INFO, logger="edge_runtime"):
        with VisionChat.from_dir(tiny_f16_dir, n_ctx=512, cost_cache_dir=None):
            pass
    hints = [r.getMessage() for r in caplog.records if "would encode faster here" in r.getMessage()]
    assert len(hints) == 1 and f"is f16; {expected} would encode faster here" in hints[0]
