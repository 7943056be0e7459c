"""Ask a converted Qwen3-VL about a picture, then a follow-up that reuses the KV cache.

    python examples/chat_with_image.py MODEL_DIR photo.jpg

MODEL_DIR is what `edge-convert` wrote (it holds manifest.json).
"""
from __future__ import annotations

import sys

from edge_runtime import VisionChat


def main(model_dir: str, image: str) -> None:
    with VisionChat.from_dir(model_dir, n_ctx=4096) as chat:
        for piece in chat.stream("What is in this picture?", images=[image]):
            print(piece, end="", flush=True)
        print(f"\n[{chat.last_stats.summary()}]\n")

        # Same image, new question: no re-encoding, only the new tokens are evaluated.
        print(chat.ask("What colours stand out?", max_tokens=128))
        print(f"[{chat.last_stats.summary()}]")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
