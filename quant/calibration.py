"""What an importance matrix is computed over: built-in images and questions, or a folder of your own."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import QuantError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
PROMPTS_FILE = "prompts.txt"


@dataclass(frozen=True)
class CalibrationSample:
    prompt: str
    image: Any | None = None  # a PIL image, or None for a text-only prompt
    source: str = "builtin"


BUILTIN_QUESTIONS = (
    "Describe this image in detail.",
    "What shapes and colors do you see?",
    "How many objects are in the picture, and where are they?",
    "Is there any text in this image? What does it say?",
    "What is in the top left corner?",
    "Compare the left half of the image with the right half.",
)
BUILTIN_TEXT = (
    "Write a short paragraph about why small language models are useful on edge devices.",
    "List three differences between a cat and a dog.",
    "Translate 'good morning, how are you?' into French and German.",
    "def fibonacci(n):\n    # return the n-th Fibonacci number\n",
    "What is 17 times 23? Explain the steps.",
)


def synthetic_images(size: tuple[int, int] = (320, 240)) -> list[Any]:
    """A few deterministic pictures with edges, gradients, shapes and noise."""
    from PIL import Image, ImageDraw

    w, h = size
    rng = np.random.default_rng(1234)
    yy, xx = np.mgrid[0:h, 0:w]
    grad = np.stack([xx / w * 255, yy / h * 255, np.full_like(xx, 128.0)], -1).astype(np.uint8)
    checker = ((((xx // 20) + (yy // 20)) % 2) * 200 + 30).astype(np.uint8)
    imgs = [Image.fromarray(grad), Image.fromarray(np.stack([checker, checker[::-1], 255 - checker], -1))]
    shapes = Image.new("RGB", size, (240, 240, 230))
    d = ImageDraw.Draw(shapes)
    d.ellipse([w * 0.1, h * 0.1, w * 0.45, h * 0.55], fill=(200, 30, 30))
    d.rectangle([w * 0.55, h * 0.2, w * 0.9, h * 0.8], fill=(30, 60, 200))
    d.polygon([(w * 0.2, h * 0.9), (w * 0.4, h * 0.6), (w * 0.6, h * 0.9)], fill=(30, 160, 60))
    d.text((w * 0.05, h * 0.02), "STOP 42", fill=(0, 0, 0))
    imgs.append(shapes)
    stripes = (np.sin(xx / 6.0 + yy / 11.0) * 100 + 128).astype(np.uint8)
    imgs.append(Image.fromarray(np.stack([stripes, 255 - stripes, stripes // 2], -1)))
    noise = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
    imgs.append(Image.fromarray(noise).resize(size, Image.NEAREST))
    return imgs


def builtin_calibration(image_size: tuple[int, int] = (320, 240)) -> list[CalibrationSample]:
    imgs = synthetic_images(image_size)
    samples = [CalibrationSample(BUILTIN_QUESTIONS[i % len(BUILTIN_QUESTIONS)], img) for i, img in enumerate(imgs)]
    return samples + [CalibrationSample(t) for t in BUILTIN_TEXT]


def load_calibration(directory: str | Path) -> list[CalibrationSample]:
    """DIR/*.png|jpg|... paired round-robin with the lines of DIR/prompts.txt; every prompt also runs text-only."""
    from PIL import Image

    d = Path(directory)
    if not d.is_dir():
        raise QuantError(f"{d}: calibration directory not found; it should hold images and a {PROMPTS_FILE}.")
    prompts: list[str] = []
    pf = d / PROMPTS_FILE
    if pf.is_file():
        prompts = [ln.strip() for ln in pf.read_text(encoding="utf-8").splitlines() if ln.strip()]
    images = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images and not prompts:
        raise QuantError(f"{d}: no images ({', '.join(IMAGE_SUFFIXES)}) and no {PROMPTS_FILE}; nothing to calibrate on.")
    questions = prompts or ["Describe this image."]
    samples = []
    for i, p in enumerate(images):
        try:
            img = Image.open(p).convert("RGB")
        except OSError as e:
            raise QuantError(f"{p}: cannot read this image ({e}).") from e
        samples.append(CalibrationSample(questions[i % len(questions)], img, str(p)))
    samples += [CalibrationSample(q, None, str(pf)) for q in prompts]
    return samples
