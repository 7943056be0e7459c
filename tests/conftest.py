"""Shared fixtures: tiny synthetic checkpoints, converted once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from convert import convert_checkpoint
from edge_models.qwen3vl.synthetic import SyntheticSpec, build_checkpoint
from edge_bench.scenario import bench_image


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
    never writes into the user's ~/.cache/qwen3-vl-edge."""
    root = tmp_path_factory.mktemp("cache-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root))
        mp.delenv("EDGE_CACHE_DIR", raising=False)
        yield root


class Artifacts:
    """Builds and converts synthetic checkpoints on demand, caching by spec."""

    def __init__(self, root: Path):
        self.root = root
        self._models: dict[SyntheticSpec, Path] = {}
        self._converted: dict[tuple[SyntheticSpec, str], Path] = {}

    def model(self, spec: SyntheticSpec = SyntheticSpec()) -> Path:
        if spec not in self._models:
            self._models[spec] = build_checkpoint(self.root / f"ckpt-{len(self._models)}", spec)
        return self._models[spec]

    def converted(self, spec: SyntheticSpec = SyntheticSpec(), quant: str = "f16") -> Path:
        key = (spec, quant)
        if key not in self._converted:
            out = self.root / f"gguf-{len(self._converted)}-{quant}"
            convert_checkpoint(self.model(spec), out, quant, progress=False)
            self._converted[key] = out
        return self._converted[key]


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
