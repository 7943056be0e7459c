"""Shared fixtures: tiny synthetic checkpoints, converted once per session."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from convert import convert_checkpoint
from edge_models.qwen3vl.synthetic import SyntheticSpec, build_checkpoint
from edge_runtime.bench.scenario import bench_image


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
