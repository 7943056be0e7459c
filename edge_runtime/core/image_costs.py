"""The device cost model hooked to a loaded engine: what an image costs here, measured before the first plan.

The cost of encoding and of evaluating a prompt token on this device decides each image's
token budget (vision/image_budget.py). It is read from the cost cache at load (the user
cache dir unless the caller says otherwise); where this device and model pair has no entry
yet, the engine calibrates it at load (`calibration_image`: a small image encoded and
prefilled through the same path an ask takes, scaled by the FLOP model), so even the first
photo of a fresh process is planned from this device's speed. The first real encode and
prefill replace the calibration once; each measurement is stored for later processes and
for `edge-convert --plan`.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np

from edge_llama import Model
from edge_llama.hardware import fastest_projector_type, this_cpuinfo
from edge_llama.offload import projector_free_bytes

from edge_runtime.core.options import EngineOptions
from edge_runtime.vision.disk_cache import user_cache_dir
from edge_runtime.vision.image_budget import (DeviceCost, Planner, cost_key, device_key, idle_expert_params, load_cost,
                                              save_cost, text_flops_per_token)
from edge_runtime.vision.image_input import ImageInput
from edge_runtime.vision.vision_spec import VisionSpec

log = logging.getLogger("edge_runtime")

# The calibration image's grid (merged tokens across, down): 32 tokens, the fewest whose prefill the
# cost model takes as a rate (Engine.prefill). A tenth of a 640x480 image's encode, through the same
# kernels; smaller images are dominated by per-call overhead and under-rate the device more (the
# first real encode replaces the calibration anyway; see docs/bench.md).
CALIBRATION_GRID = (8, 4)


def cost_dir(option: str | None) -> Path | None:
    """Where the rates are kept: "auto" the user cache dir, None in memory only, else that folder."""
    if option is None:
        return None
    return user_cache_dir() if option == "auto" else Path(option).expanduser()


def calibration_image(spec: VisionSpec) -> ImageInput:
    """A small structured image (no digest: no encoder cache keeps it) for the load-time calibration."""
    gx, gy = CALIBRATION_GRID
    h, w = gy * spec.factor, gx * spec.factor
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack([(x * 255 // max(1, w - 1)), (y * 255 // max(1, h - 1)), ((x // 16 + y // 16) % 2) * 255],
                      axis=-1).astype(np.uint8)
    return ImageInput.from_array(pixels, "")


class ImageCosts:
    """One engine's device cost model and the image budgets it yields."""

    def __init__(self, options: EngineOptions, model_path: Path, mmproj_path: Path, vision: VisionSpec,
                 text_model: Model, threads: int, projector_gpu: bool, n_gpu_layers: int) -> None:
        self.options = options
        self.vision = vision
        self._lock = threading.Lock()  # the server's vision and scheduler threads both measure
        self._calibrating = False
        self._dir = cost_dir(options.cost_cache_dir)
        self._key = cost_key(model_path, mmproj_path, device_key(threads, projector_gpu, n_gpu_layers))
        self.cost: DeviceCost = load_cost(self._dir, self._key, projector_gpu, vision.signature)
        # an MoE token runs through a few experts only: the idle ones cost it nothing
        active = text_model.n_params - idle_expert_params(text_model.meta, text_model.meta("general.architecture") or "")
        self.text_flops_per_token = text_flops_per_token(active, text_model.n_vocab, text_model.n_embd)
        self.vision_free_bytes = projector_free_bytes(projector_gpu)
        faster, why = fastest_projector_type(this_cpuinfo(), projector_gpu)
        if vision.weight_type and vision.weight_type not in (faster, "f32"):
            log.info("the projector %s is %s; %s would encode faster here (%s): edge-convert --mmproj-quant auto",
                     mmproj_path.name, vision.weight_type, faster, why)

    @property
    def needs_calibration(self) -> bool:
        """Nothing measured yet for this device and model pair (neither stored nor calibrated)."""
        return not (self.cost.measured and self.cost.prefill_measured)

    @contextlib.contextmanager
    def calibrating(self) -> Iterator[None]:
        """Measurements inside are the calibration: taken where nothing was measured, replaced by the
        first real ones."""
        self._calibrating = True
        try:
            yield
        finally:
            self._calibrating = False

    def planner(self, n_ctx_seq: int) -> Planner:
        """Image budgets as the cost model stands, for a sequence of `n_ctx_seq` cells."""
        opts = self.options
        return Planner(self.vision, n_ctx_seq, replace(self.cost), self.text_flops_per_token,
                       opts.image_latency_s, opts.image_min_tokens, opts.image_max_tokens, self.vision_free_bytes)

    def measured(self, kind: str, tokens: int, seconds: float) -> None:
        """Feed the model with one encode ("encoder") or prompt evaluation ("prefill") of `tokens`."""
        flops = self.vision.encoder_flops(tokens) if kind == "encoder" else tokens * self.text_flops_per_token
        with self._lock:
            if self.cost.record(kind, flops, seconds, calibration=self._calibrating):
                save_cost(self._dir, self._key, self.cost)
