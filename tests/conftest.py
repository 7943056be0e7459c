"""Shared fixtures: tiny synthetic checkpoints, converted once per session."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from edge_models.qwen3vl.synthetic import SyntheticSpec
from edge_bench.scenario import bench_image

# A folder of converted GGUF pairs kept across runs: the x86 run of the arm64 lane writes them
# (with torch), the run inside the arm64 root (the runtime only, no torch) reads them.
GGUF_STORE_ENV = "EDGE_TEST_GGUF_STORE"


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # ValueError: blocked with sys.modules[name] = None
        return False


HAS_TORCH = _importable("torch") and _importable("transformers")
# Modules that import transformers at the top (smart_resize is their independent reference):
# not even collected where it is missing, deselected with the `torch` tests otherwise.
TORCH_MODULES = ("test_image_budget.py", "test_image_plan.py")
collect_ignore = [] if HAS_TORCH else list(TORCH_MODULES)
# Select as if torch were missing (the x86 half of the arm64 lane runs the root's selection).
RUNTIME_ONLY = not HAS_TORCH or os.environ.get("EDGE_TEST_RUNTIME_ONLY") == "1"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "torch: needs torch/transformers when it runs (a checkpoint, a transformers reference, "
        "conversion); deselected where they are not installed, as on a Raspberry Pi")
    config.addinivalue_line(
        "markers", "browser: drives the system's headless Chromium; in a runtime-only run without one (the arm64 "
        "root) skipped with the reason, so the summary counts them")
    config.addinivalue_line(
        "markers", "docs: builds the site with MkDocs (the docs extra); in a runtime-only run without it (the "
        "arm64 root) skipped with the reason")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report carries the log of every edge-serve still running: a dropped connection
    or a 500 is explained there, and the log file is deleted when the server stops."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        from support.server import ServerProcess

        for server in list(ServerProcess.running):
            report.sections.append((f"edge-serve log (port {server.port}, last 8000 characters)", server.log_text()))


def pytest_collection_modifyitems(config, items):
    """Without torch, tests marked `torch` (or using the HF checkpoint fixture) are deselected, and
    pytest's summary counts them: the runtime-only install runs every other test."""
    if not RUNTIME_ONLY:
        return
    _skip_browser_tests_without_chromium(items)
    _skip_docs_tests_without_mkdocs(items)
    keep, drop = [], []
    for item in items:
        needs = (item.get_closest_marker("torch") or "tiny_model_dir" in getattr(item, "fixturenames", ())
                 or item.path.name in TORCH_MODULES)
        (drop if needs else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _skip_browser_tests_without_chromium(items) -> None:
    """Only where the runtime-only run has no Chromium (the emulated arm64 root): on x86 a missing
    browser stays an error that names what to install."""
    from support.browser import find_chromium

    try:
        find_chromium()
    except RuntimeError as exc:
        skip = pytest.mark.skip(reason=f"browser test in a runtime-only run: {exc}")
        for item in items:
            if item.get_closest_marker("browser"):
                item.add_marker(skip)


def _skip_docs_tests_without_mkdocs(items) -> None:
    """The site is built by `make docs` on x86; a runtime-only install has no docs extra."""
    if _importable("mkdocs"):
        return
    skip = pytest.mark.skip(reason="docs test in a runtime-only run: mkdocs is not installed (the docs extra)")
    for item in items:
        if item.get_closest_marker("docs"):
            item.add_marker(skip)


# Where the code would put its caches (encoder outputs, device costs, AMX verdicts) if the
# tests did not redirect them; read before the fixture below changes the environment.
REAL_CACHE_ROOTS = tuple(
    Path(p).expanduser().resolve()
    for p in (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen3-vl-edge",
              os.environ.get("EDGE_CACHE_DIR"))
    if p
)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache_home(tmp_path_factory):
    """Every cache the code keeps goes under a temporary directory for the whole run, in this
    process and in every subprocess a test starts (they inherit the environment): a test run
    never writes into the user's ~/.cache/qwen3-vl-edge. The AMX verdict ($EDGE_CACHE_DIR) stays
    session-wide; the user cache dir proper is narrowed per module and per test below."""
    root = tmp_path_factory.mktemp("cache-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root))
        mp.setenv("EDGE_CACHE_DIR", str(root / "qwen3-vl-edge"))
        yield root


def _own_cache_home(root: Path, name: str):
    """$XDG_CACHE_HOME pointed at a fresh folder under `root` (a generator for a fixture)."""
    home = root / "homes" / hashlib.sha256(name.encode()).hexdigest()[:16]
    home.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(home))
        yield home


@pytest.fixture(scope="module", autouse=True)
def module_cache_home(isolated_cache_home, request):
    """A module's own user cache dir, for its module-scoped engines and servers: the device cost
    file each engine keeps by default (auto budgets) is never one an earlier module wrote."""
    yield from _own_cache_home(isolated_cache_home, request.node.nodeid)


@pytest.fixture(autouse=True)
def test_cache_home(isolated_cache_home, module_cache_home, request):
    """Each test's own user cache dir: no test's image budget depends on which tests ran before it."""
    yield from _own_cache_home(isolated_cache_home, request.node.nodeid)


class Artifacts:
    """Builds and converts synthetic checkpoints on demand, caching by spec."""

    def __init__(self, root: Path):
        self.root = root
        self._models: dict[SyntheticSpec, Path] = {}
        self._converted: dict[tuple[SyntheticSpec, str], Path] = {}

    def model(self, spec: SyntheticSpec = SyntheticSpec()) -> Path:
        from edge_models.qwen3vl.synthetic import build_checkpoint

        if spec not in self._models:
            self._models[spec] = build_checkpoint(self.root / f"ckpt-{len(self._models)}", spec)
        return self._models[spec]

    def converted(self, spec: SyntheticSpec = SyntheticSpec(), quant: str = "f16") -> Path:
        key = (spec, quant)
        if key not in self._converted:
            out = self.root / f"gguf-{len(self._converted)}-{quant}"
            stored = self._stored(spec, quant)
            if stored is not None and stored.is_dir():
                shutil.copytree(stored, out)  # a copy: a test may write beside the files
            elif stored is not None and not HAS_TORCH:
                raise RuntimeError(f"{stored} is missing: {GGUF_STORE_ENV} holds no conversion of {spec} "
                                   f"at {quant}; run the same tests where torch is installed to write it")
            else:
                from convert import convert_checkpoint

                convert_checkpoint(self.model(spec), out, quant, progress=False)
                if stored is not None:
                    tmp = stored.with_name(stored.name + f".{os.getpid()}.partial")
                    shutil.copytree(out, tmp)
                    os.replace(tmp, stored)
            self._converted[key] = out
        return self._converted[key]

    @staticmethod
    def _stored(spec: SyntheticSpec, quant: str) -> Path | None:
        """Where the store keeps this conversion (None without a store): named by the spec and type."""
        store = os.environ.get(GGUF_STORE_ENV)
        if not store:
            return None
        digest = hashlib.sha256(repr((spec, quant)).encode()).hexdigest()[:16]
        return Path(store) / f"{quant}-{digest}"


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Artifacts:
    return Artifacts(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="session")
def tiny_model_dir(artifacts) -> Path:
    return artifacts.model()


@pytest.fixture(scope="session")
def tiny_f32_dir(artifacts) -> Path:
    return artifacts.converted(quant="f32")


@pytest.fixture(scope="session")
def tiny_f16_dir(artifacts) -> Path:
    return artifacts.converted(quant="f16")


def make_test_image(width: int = 256, height: int = 192, seed: int = 0) -> Image.Image:
    """Structured content; the default sides are multiples of 32 so nothing resizes it."""
    return bench_image(width, height, seed)


@pytest.fixture(scope="session")
def test_image() -> Image.Image:
    return make_test_image()
