"""The inputs every measured party gets: the same image, questions and prompts.

A comparison means something only when the runtime and each baseline see the
same pixels, the same words and the same number of tokens, so they all build
their inputs here.
"""
from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageDraw

FIRST_QUESTION = "What is in this picture? Describe it."
FOLLOW_UP = "And what colour is the box on the left?"
FOLLOW_UP_TOKENS = 2  # the follow-up is about TTFT; decode is measured on the first answer
# Common words: one token each (with their leading space) in Qwen's tokenizer
# and in the synthetic checkpoints' tokenizer, so N words ~ N tokens.
_WORDS = (
    "the a picture shows one red box on the left and two blue circles in the center of this image with "
    "light background under sky near house window door small large dark white black green yellow"
).split()


def bench_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like test image: gradients, noise and shapes (flat colour compresses unrealistically)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], -1)
    noise = rng.integers(0, 40, size=(height, width, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.rectangle([width // 8, height // 6, width // 3, height // 2], fill=(220, 30, 30))
    draw.ellipse([width // 2, height // 3, width - 20, height - 20], fill=(30, 30, 220))
    return img


def png_bytes(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def filler_text(n_words: int) -> str:
    """A text prompt of about `n_words` tokens for the prefill measurements."""
    words = [_WORDS[(i * 7) % len(_WORDS)] for i in range(n_words)]
    return " ".join(words)


def chat_prompt(user_text: str, marker: str | None = None) -> str:
    """Qwen's chat format for one user turn (the image first, as the template puts it)."""
    image = marker or ""
    return f"<|im_start|>user\n{image}{user_text}<|im_end|>\n<|im_start|>assistant\n"


def follow_up_suffix(user_text: str) -> str:
    """What a follow-up adds after the assistant's answer tokens."""
    return f"<|im_end|>\n<|im_start|>user\n{user_text}<|im_end|>\n<|im_start|>assistant\n"
