"""The test run never writes into the user's real cache directory."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REAL_CACHE_ROOTS
from edge_llama import amx
from edge_runtime.vision.disk_cache import user_cache_dir

_PROBE = ("from edge_runtime.vision.disk_cache import user_cache_dir; from edge_llama import amx; "
          "print(user_cache_dir()); print(amx.cache_dir())")


def _under_real_cache(path: Path) -> bool:
    path = path.resolve()
    return any(path == root or root in path.parents for root in REAL_CACHE_ROOTS)


def test_caches_resolve_under_the_temporary_home(isolated_cache_home):
    for path in (user_cache_dir(), amx.cache_dir()):
        assert not _under_real_cache(path), f"{path} is in the user's real cache"
        assert isolated_cache_home in path.resolve().parents


def test_subprocesses_inherit_the_temporary_home(isolated_cache_home):
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True,
                         env=os.environ.copy()).stdout.split()
    assert len(out) == 2
    for line in out:
        path = Path(line)
        assert not _under_real_cache(path), f"a CLI subprocess would write its cache to {path}"
        assert isolated_cache_home in path.resolve().parents


def test_cache_dir_follows_the_environment_at_call_time(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert user_cache_dir() == tmp_path / "qwen3-vl-edge"
    assert amx.cache_dir() == tmp_path / "qwen3-vl-edge"
    monkeypatch.setenv("EDGE_CACHE_DIR", str(tmp_path / "edge"))
    assert amx.cache_dir() == tmp_path / "edge"


def test_each_test_has_its_own_user_cache_dir(isolated_cache_home, module_cache_home, test_cache_home):
    """The device cost file (kept by default in the user cache dir) is per test: budgets never depend on order."""
    assert user_cache_dir().parent == test_cache_home != module_cache_home
    assert isolated_cache_home in test_cache_home.parents
    assert amx.cache_dir() == isolated_cache_home / "qwen3-vl-edge"  # the AMX verdict stays session-wide
