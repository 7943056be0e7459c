"""The runtime half of `make demo`: chat about an example image and show the numbers.

`edge_app.demo` builds and converts a random-weight model, then calls `run(out_dir)`.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from PIL import Image, ImageDraw

from edge_runtime.chat.chat import VisionChat
from edge_runtime.core.stats import GenerationStats

NOISE_NOTE = (
    "note: this model has random weights, so its words are noise. The point is the path:\n"
    "      image -> vision encoder -> KV cache -> streamed tokens, and the timings below."
)
REAL_MODEL_HOWTO = (
    "to chat with the real model:\n"
    "  hf download Qwen/Qwen3-VL-2B-Instruct --local-dir Qwen3-VL-2B-Instruct\n"
    "  edge-convert Qwen3-VL-2B-Instruct -o models/qwen3-vl-2b\n"
    "  edge-chat models/qwen3-vl-2b --image photo.jpg \"What is in this picture?\"\n"
    "  (or in Python: VisionChat.from_dir('models/qwen3-vl-2b').ask('...', images=['photo.jpg']))"
)


def example_image(width: int = 320, height: int = 240) -> Image.Image:
    """A red square, a blue circle and a yellow sun on a sky-to-grass background."""
    img = Image.new("RGB", (width, height), (135, 190, 235))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, height * 2 // 3, width, height], fill=(70, 150, 60))
    draw.rectangle([width // 10, height // 3, width // 3, height * 3 // 4], fill=(210, 40, 40))
    draw.ellipse([width // 2, height // 3, width // 2 + height // 3, height * 2 // 3], fill=(40, 60, 210))
    draw.ellipse([width - 70, 15, width - 20, 65], fill=(250, 220, 50))
    return img


def run(out_dir: str | Path, *, max_tokens: int = 24, out: TextIO = sys.stdout) -> list[GenerationStats]:
    """Two questions about one image: the second reuses the KV cache (watch TTFT)."""
    image = example_image()
    questions = ("What is in this picture?", "What colour is the square?")
    stats: list[GenerationStats] = []
    print(f"\nchatting with {out_dir} about a {image.width}x{image.height} example image", file=out)
    print(NOISE_NOTE, file=out)
    with VisionChat.from_dir(out_dir, n_ctx=2048) as chat:
        for i, question in enumerate(questions):
            print(f"\nuser: {question}\nassistant: ", end="", file=out, flush=True)
            for piece in chat.stream(question, [image] if i == 0 else None, max_tokens=max_tokens, temperature=0):
                print(piece, end="", file=out, flush=True)
            print(file=out)
            assert chat.last_stats is not None
            stats.append(chat.last_stats)
            print(f"  [{chat.last_stats.summary()}]", file=out)
    first, follow = stats
    if first.ttft_s > 0:
        print(
            f"\nfollow-up TTFT is {follow.ttft_s / first.ttft_s:.1%} of the first question's: "
            f"{follow.reused_tokens} prompt tokens came from the KV cache and the image was not re-encoded.",
            file=out,
        )
    print("\n" + REAL_MODEL_HOWTO, file=out)
    return stats


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m edge_runtime.cli.demo OUT_DIR")
    run(sys.argv[1])
