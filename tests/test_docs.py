"""The docs site builds with `mkdocs build --strict`, and that build can fail: a broken link or
anchor, an API entry showing an object without a docstring, an export left out of the reference.

The second half is proven on a planted site (its own package and page) so that the checks are
seen to fire; the expected findings are written out here by hand.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.docs

ROOT = Path(__file__).resolve().parents[1]
HOOK = ROOT / "docs" / "hooks" / "api_docstrings.py"


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          cwd=config.parent, capture_output=True, text=True, env=env, timeout=600)


def test_the_site_builds_strict_with_its_api_reference(tmp_path):
    done = build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "site" / "api" / "runtime" / "index.html").read_text(encoding="utf-8")
    for name in ("VisionChat", "EngineOptions", "GenerationStats", "SavedConversationError", "create_qwen3_vl_2b_plugin"):
        assert re.search(rf'id="edge_runtime\.[\w.]*\.{name}"', page), name  # a heading of its own
    assert re.search(r'id="edge_runtime\.[\w.]*\.VisionChat\.ask"', page)


PLANTED_PACKAGE = '''\
"""A package planted for the docs checks."""
__all__ = ["Documented", "bare", "forgotten", "lazy"]


def __getattr__(name):  # a lazy export (PEP 562), which griffe cannot follow by itself
    if name == "lazy":
        from .later import lazy
        return lazy
    raise AttributeError(name)


class Documented:
    """Has a docstring."""

    field = 3  # a plain attribute: the class docstring speaks for it

    def method(self):
        """Has one too."""

    def bare_method(self):
        pass

    @property
    def bare_property(self):
        return 1

    def _private(self):
        pass


def bare():
    pass


def forgotten():
    """Exported and documented, but on no page."""
'''

PLANTED_CONFIG = f'''\
site_name: planted
theme: mkdocs
hooks: ["{HOOK}"]
validation:
  anchors: warn
extra:
  api_complete: [planted]
plugins:
  - mkdocstrings:
      handlers:
        python:
          paths: [.]
          options:
            filters: ["!^_"]
'''

PLANTED_PAGE = '''\
# Planted

A [missing page](gone.md) and a [missing anchor](#no-such-heading).

::: planted.Documented

::: planted.bare

::: planted.lazy
'''


def test_strict_build_fails_on_planted_link_anchor_docstring_and_export(tmp_path):
    (tmp_path / "planted").mkdir()
    (tmp_path / "planted" / "__init__.py").write_text(PLANTED_PACKAGE)
    (tmp_path / "planted" / "later.py").write_text("def lazy():\n    pass\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text(PLANTED_PAGE)
    (tmp_path / "mkdocs.yml").write_text(textwrap.dedent(PLANTED_CONFIG))
    done = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 1
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    undocumented = sorted(m.group(1) for w in warnings if (m := re.search(r"shows (\S+) .* without a docstring", w)))
    assert undocumented == ["planted.Documented.bare_method", "planted.Documented.bare_property", "planted.bare",
                            "planted.later.lazy"]  # found where the lazy export is defined
    assert any("'gone.md'" in w for w in warnings)
    assert any("'#no-such-heading'" in w for w in warnings)
    assert any("planted.forgotten is exported" in w for w in warnings)
    assert len(warnings) == 7, warnings
