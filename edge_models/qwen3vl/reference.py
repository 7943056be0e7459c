"""The transformers reference model: what converted files are measured against.

Used by the parity tests, importance-matrix calibration and the transformers
baseline of the benchmark. Needs the `convert` extra (torch, transformers).
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def image_processor(model_dir: str | Path):
    """The checkpoint's (slow, exact) image processor; transformers 5 without torchvision has a PIL one."""
    try:
        from transformers import Qwen2VLImageProcessorPil as Processor  # transformers 5 without torchvision
    except ImportError:  # transformers 4.x
        from transformers import Qwen2VLImageProcessor as Processor
    return Processor.from_pretrained(str(model_dir))


MODEL_CLASS = "Qwen3VLForConditionalGeneration"  # transformers class names (the MoE sibling has its own)
CONFIG_CLASS = "Qwen3VLConfig"


def tensor_shapes(config: dict[str, Any], model_class: str = MODEL_CLASS,
                  config_class: str = CONFIG_CLASS) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes as transformers (this version) saves them, without allocating weights."""
    import torch
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config))
    shapes = {k: tuple(p.shape) for k, p in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)
    return shapes


@dataclass
class Reference:
    """A loaded Qwen3-VL model plus what it needs to build inputs."""

    model: Any
    tokenizer: Any  # tokenizers.Tokenizer
    processor: Any
    config: dict[str, Any]
    model_class = MODEL_CLASS

    @classmethod
    def load(cls, model_dir: str | Path, dtype: str = "float32") -> "Reference":
        import torch
        import transformers
        from tokenizers import Tokenizer

        model = getattr(transformers, cls.model_class).from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
        model.eval()
        return cls(model, Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")),
                   image_processor(model_dir), json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")))

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def pixels(self, image) -> tuple[Any, Any]:
        out = self.processor(images=[image], return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def text_logits(self, ids: list[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids]))
        return out.logits[0].float().numpy()

    def image_embeddings(self, image) -> np.ndarray:
        """Merged image tokens x (main + deepstack features), llama.cpp's layout."""
        import torch

        pixel_values, grid = self.pixels(image)
        visual = self.model.model.visual
        with torch.no_grad():
            out = visual(pixel_values.to(visual.dtype), grid_thw=grid)
        main = getattr(out, "pooler_output", None)
        deep = getattr(out, "deepstack_features", None)
        if main is None:  # transformers 4.57 returns (merged, deepstack list)
            main, deep = out
        return torch.cat([main, *deep], dim=-1).float().numpy()

    def image_prompt_logits(self, before: str, image, after: str) -> np.ndarray:
        """Last-position logits of `before <image> after`, the image expanded to its pad tokens."""
        import torch

        pixel_values, grid = self.pixels(image)
        merge = self.config["vision_config"].get("spatial_merge_size", 2)
        n_image = int(grid.prod()) // (merge * merge)
        ids = (self.tokenize(before) + [self.config["vision_start_token_id"]] + [self.config["image_token_id"]] * n_image
               + [self.config["vision_end_token_id"]] + self.tokenize(after))
        extra = {}
        if "mm_token_type_ids" in inspect.signature(self.model.forward).parameters:  # transformers 5
            extra["mm_token_type_ids"] = torch.tensor([[int(i == self.config["image_token_id"]) for i in ids]])
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids]), pixel_values=pixel_values, image_grid_thw=grid, **extra)
        return out.logits[0, -1].float().numpy()
