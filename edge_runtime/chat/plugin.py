"""The seed project's plugin API: one call, one image, one answer string.

    plugin = create_qwen3_vl_2b_plugin("models/")   # a converter output directory
    plugin.generate_multimodal_response(image_path="photo.jpg", prompt="What is this?")

Each call is independent (no chat history); asking again about the same image
still skips the vision encoder and reuses the KV prefix.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edge_runtime.chat.chat import VisionChat

MODEL_DIR_ENV = "QWEN3_VL_MODEL_DIR"
DEFAULT_MODEL_DIR = Path("models")  # edge-convert's default output directory


class Qwen3VLPlugin:
    def __init__(self, model_dir: str | Path, **chat_options: Any) -> None:
        self.model_dir = Path(model_dir)
        self.chat = VisionChat.from_dir(self.model_dir, **chat_options)

    def generate_multimodal_response(self, image_path: str | Path | None = None, prompt: str = "", **gen: Any) -> str:
        """Answer `prompt` about the image at `image_path` (or text only when it is None)."""
        content: list[dict] = []
        if image_path is not None:
            content.append({"type": "image", "image": str(image_path)})
        content.append({"type": "text", "text": prompt})
        messages = [{"role": "user", "content": content}]
        if self.chat.system_prompt:
            messages.insert(0, {"role": "system", "content": self.chat.system_prompt})
        return self.chat.generate(messages, **gen)

    @property
    def last_stats(self) -> Any:
        return self.chat.last_stats

    def close(self) -> None:
        self.chat.close()

    def __enter__(self) -> "Qwen3VLPlugin":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_qwen3_vl_2b_plugin(model_dir: str | Path | None = None, **chat_options: Any) -> Qwen3VLPlugin:
    """Load Qwen3-VL-2B from `model_dir`, else $QWEN3_VL_MODEL_DIR, else ./models."""
    chosen = model_dir or os.environ.get(MODEL_DIR_ENV) or DEFAULT_MODEL_DIR
    return Qwen3VLPlugin(chosen, **chat_options)
