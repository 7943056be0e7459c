"""Shared fixtures: tiny synthetic checkpoints, converted once per session."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from convert import convert_checkpoint
from convert.synthetic import SyntheticSpec, build_checkpoint


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
    """Structured content (gradients, shapes, noise): sides multiples of 32 so nothing resizes it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], -1)
    noise = rng.integers(0, 40, size=(height, width, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.rectangle([width // 8, height // 6, width // 3, height // 2], fill=(220, 30, 30))
    draw.ellipse([width // 2, height // 3, width - 20, height - 20], fill=(30, 30, 220))
    return img


@pytest.fixture(scope="session")
def test_image() -> Image.Image:
    return make_test_image()
