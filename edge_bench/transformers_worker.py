"""Baseline (c): transformers in bf16 on the CPU, the Hugging Face checkpoint itself.

What a Python user would run instead of a GGUF runtime. Same image, same
question, same threads; generation is greedy with a fixed number of new
tokens (min_new_tokens) so the decode rate covers the same count. Per-token
times come from a streamer, which generate() calls once per new token.
"""
from __future__ import annotations

import inspect
import time

from .scenario import FIRST_QUESTION, bench_image
from .summary import decode_rates
from .workers import Recorder, WorkerSpec


class TokenClock:
    """A generate() streamer that only timestamps tokens (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def image_prompt_ids(ref, n_image_tokens: int) -> list[int]:
    """Qwen's chat format with the image expanded to its pad tokens, as the HF processor does."""
    cfg = ref.config
    return (ref.tokenize("<|im_start|>user\n") + [cfg["vision_start_token_id"]]
            + [cfg["image_token_id"]] * n_image_tokens + [cfg["vision_end_token_id"]]
            + ref.tokenize(f"{FIRST_QUESTION}<|im_end|>\n<|im_start|>assistant\n"))


def generate_inputs(ref, image) -> tuple[dict, int]:
    import torch

    pixel_values, grid = ref.pixels(image)
    merge = ref.config["vision_config"].get("spatial_merge_size", 2)
    n_image = int(grid.prod()) // (merge * merge)
    ids = image_prompt_ids(ref, n_image)
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
              "pixel_values": pixel_values.to(ref.model.dtype), "image_grid_thw": grid}
    if "mm_token_type_ids" in inspect.signature(ref.model.forward).parameters:  # transformers 5
        inputs["mm_token_type_ids"] = torch.tensor([[int(i == ref.config["image_token_id"]) for i in ids]])
    return inputs, n_image


def _pad_token_id(ref) -> int:
    """generate() wants one for a batch of one; the checkpoint's, else its first end-of-sequence token."""
    gen = ref.model.generation_config
    pad = gen.pad_token_id if gen.pad_token_id is not None else gen.eos_token_id
    return pad[0] if isinstance(pad, (list, tuple)) else int(pad or 0)


def measure(spec: WorkerSpec, rec: Recorder) -> None:
    import torch

    from edge_models import family_for_checkpoint

    m, res = spec.measure, spec.config.resolution
    if not spec.hf_dir:
        # a plain ValueError: a worker started without the checkpoint edge-bench always passes: a programming error
        raise ValueError("the transformers baseline needs the Hugging Face checkpoint directory")
    reference = family_for_checkpoint(spec.hf_dir).module("reference")  # imported before the clock starts
    torch.set_num_threads(m.threads)
    t0 = time.perf_counter()
    ref = reference.Reference.load(spec.hf_dir, dtype="bfloat16")
    rec.sample("load_s", time.perf_counter() - t0)
    inputs, n_image = generate_inputs(ref, bench_image(res.width, res.height))
    rec.value("image_tokens", n_image)
    rec.value("prompt_tokens", int(inputs["input_ids"].shape[1]))
    pad = _pad_token_id(ref)
    for _ in rec.rounds(m):
        clock = TokenClock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            ref.model.generate(**inputs, max_new_tokens=m.decode_tokens, min_new_tokens=m.decode_tokens,
                               do_sample=False, streamer=clock, pad_token_id=pad)
        rec.sample("ttft_first_s", clock.times[0] - t0)
        rates = decode_rates(clock.times)
        if rates:
            rec.sample("decode_tok_s", rates[0])
            rec.sample("decode_mean_tok_s", rates[1])
        rec.value("decode_tokens", len(clock.times))
    # the family's reference picks the class (Qwen3VLMoeForConditionalGeneration for an MoE checkpoint)
    rec.note(f"{type(ref.model).__name__}, bf16 weights on the CPU; image encode and prefill are part of "
             "ttft_first_s")
