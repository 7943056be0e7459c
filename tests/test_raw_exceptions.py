"""Nothing raw: library refusals are named EdgeErrors, and every plain `raise ValueError/TypeError`
or `except Exception` left in library code says in a comment why it stays (issue 22's sweep)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from edge_common.errors import EdgeError
from edge_runtime.core.options import EngineOptions, GenerationOptions
from edge_runtime.server.config import ServerOptions
from edge_runtime.vision.images import ImageLimits
from edge_runtime.vision.resize import PixelBudget

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ["*.py", ":!tests", ":!benchmarks", ":!examples", ":!docs"]
RAW = re.compile(r"raise (ValueError|TypeError)\b|except Exception\b")


def raw_sites() -> list[tuple[str, int, str, str]]:
    """(file, line, text, the line above) of each raw raise / broad except in library code."""
    out = subprocess.run(["git", "grep", "-nE", RAW.pattern.replace(r"\b", ""), "--", *LIBRARY], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    sites = []
    for hit in out.splitlines():
        path, line, text = hit.split(":", 2)
        if RAW.search(text):
            above = (ROOT / path).read_text(encoding="utf-8").splitlines()[int(line) - 2]
            sites.append((path, int(line), text, above))
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
