"""The device cost model hooked to a loaded engine: what an image costs here, learnt from use.

The cost of encoding and of evaluating a prompt token on this device decides each image's
token budget (vision/image_budget.py). It is read from the cost cache at load, moves once
on the first measurement of each kind, and is stored for later processes and for
`edge-convert --plan`.
"""
from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

from edge_llama import Model
from edge_llama.offload import projector_free_bytes

from edge_runtime.core.options import EngineOptions
from edge_runtime.vision.image_budget import (DeviceCost, Planner, cost_key, device_key, idle_expert_params, load_cost,
                                              save_cost, text_flops_per_token)
from edge_runtime.vision.vision_spec import VisionSpec


class ImageCosts:
    """One engine's device cost model and the image budgets it yields."""

    def __init__(self, options: EngineOptions, model_path: Path, mmproj_path: Path, vision: VisionSpec,
                 text_model: Model, threads: int, projector_gpu: bool, n_gpu_layers: int) -> None:
        self.options = options
        self.vision = vision
        self._lock = threading.Lock()  # the server's vision and scheduler threads both measure
        self._dir = Path(options.cost_cache_dir).expanduser() if options.cost_cache_dir else None
        self._key = cost_key(model_path, mmproj_path, device_key(threads, projector_gpu, n_gpu_layers))
        self.cost: DeviceCost = load_cost(self._dir, self._key, projector_gpu, vision.signature)
        # an MoE token runs through a few experts only: the idle ones cost it nothing
        active = text_model.n_params - idle_expert_params(text_model.meta, text_model.meta("general.architecture") or "")
        self.text_flops_per_token = text_flops_per_token(active, text_model.n_vocab, text_model.n_embd)
        self.vision_free_bytes = projector_free_bytes(projector_gpu)

    def planner(self, n_ctx_seq: int) -> Planner:
        """Image budgets as the cost model stands, for a sequence of `n_ctx_seq` cells."""
        opts = self.options
        return Planner(self.vision, n_ctx_seq, replace(self.cost), self.text_flops_per_token,
                       opts.image_latency_s, opts.image_min_tokens, opts.image_max_tokens, self.vision_free_bytes)

    def measured(self, kind: str, tokens: int, seconds: float) -> None:
        """Feed the model with one encode ("encoder") or prompt evaluation ("prefill") of `tokens`."""
        flops = self.vision.encoder_flops(tokens) if kind == "encoder" else tokens * self.text_flops_per_token
        with self._lock:
            if self.cost.record(kind, flops, seconds):
                save_cost(self._dir, self._key, self.cost)
