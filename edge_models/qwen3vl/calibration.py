"""Model inputs for importance-matrix calibration: the chat template plus Qwen's image-pad expansion.

transformers' processor inserts one <|image_pad|> per merged patch; this does
the same with the tokenizer and image processor alone, so calibration sees
exactly the token layout the model is trained on. Needs torch/transformers.
"""
from __future__ import annotations

from typing import Any

from ..errors import ModelConfigError
from .reference import image_processor

__all__ = ["image_processor", "model_inputs"]  # what quant.imatrix_compute reads of a family


def model_inputs(prompt: str, image: Any | None, tokenizer, processor, config: dict[str, Any]) -> dict[str, Any]:
    """input_ids (+ pixels) the way Qwen-style processors build them: one pad token per merged patch."""
    import torch

    content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
    if image is not None:
        content.insert(0, {"type": "image"})
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    kwargs: dict[str, Any] = {}
    if image is not None:
        pix = processor(images=[image], return_tensors="pt")
        merge = int(getattr(processor, "merge_size", 2))
        n = int(pix["image_grid_thw"].prod()) // (merge * merge)
        pad = tokenizer.convert_ids_to_tokens(int(config["image_token_id"]))
        if pad not in text:
            raise ModelConfigError("the chat template did not insert an image placeholder; cannot calibrate on images.")
        text = text.replace(pad, pad * n, 1)
        kwargs = {"pixel_values": pix["pixel_values"], "image_grid_thw": pix["image_grid_thw"]}
    ids = tokenizer(text, return_tensors="pt")
    kwargs["input_ids"] = ids["input_ids"]
    kwargs["attention_mask"] = ids["attention_mask"]
    if image is not None:
        kwargs["mm_token_type_ids"] = (ids["input_ids"] == int(config["image_token_id"])).to(torch.long)
    return kwargs
