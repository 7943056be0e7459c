"""Nothing raw: library refusals are named EdgeErrors, and every plain `raise ValueError/TypeError`
or `except Exception` left in library code says in a comment why it stays (issue 22's sweep)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from edge_common.errors import EdgeError
from edge_runtime.core.options import EngineOptions, GenerationOptions
from edge_runtime.server.config import ServerOptions
from edge_runtime.vision.images import ImageLimits
from edge_runtime.vision.resize import PixelBudget

ROOT = Path(__file__).resolve().parents[1]
NOT_LIBRARY = {"tests", "benchmarks", "examples", "docs", "build", "site"}
RAW = re.compile(r"raise (ValueError|TypeError)\b|except Exception\b")


def raw_sites() -> list[tuple[str, int, str, str]]:
    """(file, line, text, the line above) of each raw raise / broad except in library code (files read
    directly, not through git: a Pi user's copy, like the arm64 root's, may have no git)."""
    sites = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in NOT_LIBRARY or any(part.startswith(".") for part in rel.parts):
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        for no, text in enumerate(lines, 1):
            if RAW.search(text):
                sites.append((str(rel), no, text, lines[no - 2] if no > 1 else ""))
    return sites


def test_every_raw_raise_or_broad_except_in_library_code_says_why():
    sites = raw_sites()
    assert sites, "the scan found nothing: its pattern or paths are wrong"
    unexplained = [f"{path}:{line}: {text.strip()}" for path, line, text, above in sites
                   if "#" not in text and not above.strip().startswith("#")]
    assert not unexplained, "a plain ValueError/TypeError or `except Exception` needs a comment saying why:\n" + \
        "\n".join(unexplained)


@pytest.mark.parametrize("make", [
    lambda: ServerOptions(ROOT, port=0),
    lambda: ServerOptions(ROOT, stall_timeout_s=float("nan")),
    lambda: EngineOptions(n_ctx=4),
    lambda: GenerationOptions(temperature=-1.0),
    lambda: ImageLimits(max_bytes=0),
    lambda: PixelBudget(28, 100, 10),
], ids=["server-port", "server-stall", "engine-n_ctx", "temperature", "image-limits", "pixel-budget"])
def test_bad_options_are_named_edge_errors_that_stay_value_errors(make):
    with pytest.raises(EdgeError) as caught:
        make()
    assert isinstance(caught.value, ValueError)  # `except ValueError` callers keep working
