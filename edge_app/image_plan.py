"""`edge-convert --plan`'s image budgets: what the runtime's detail levels would pick on this device.

Everything is decided by the runtime's own functions (plan_for_context with the
device's cost model and free memory); this module only gathers, before any GGUF
exists, what the runtime reads from the files: the projector's shape and weight
type, and the text model's FLOPs per token, from the converter's tensor plan.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edge_common.gguf_plan import ModelShapes
from edge_llama import physical_cores
from edge_llama.offload import projector_free_bytes, projector_on_gpu, resolve_gpu_layers
from edge_runtime.vision.image_budget import (DETAILS, DeviceCost, auto_floor, cost_file, device_key, find_cost,
                                              memory_tokens, plan_for_context, text_flops_per_token)
from edge_runtime.vision.vision_spec import block_weight_type, hf_vision_spec
from quant.estimate import EXPERT_TENSOR, estimate

PLAN_IMAGES = ((4032, 3024, "photo"), (640, 480, "image"))


@dataclass(frozen=True)
class PlanDevice:
    """How edge-chat / edge-serve would run on this machine with their defaults."""

    threads: int
    gpu: bool  # the projector on a GPU
    gpu_layers: int
    free_bytes: int | None  # free memory of the projector's device (None: unknown, no cap)

    @classmethod
    def this_machine(cls) -> "PlanDevice":
        layers = resolve_gpu_layers("auto")
        gpu = projector_on_gpu(None, layers)
        return cls(physical_cores(), gpu, layers, projector_free_bytes(gpu))

    @property
    def key(self) -> str:
        return device_key(self.threads, self.gpu, self.gpu_layers)


def _elements(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _seconds(s: float) -> str:
    return "<0.001" if s < 1e-3 else f"{s:.3g}" if s < 100 else f"{s:,.0f}"


def _rates_line(found: tuple[str, DeviceCost] | None, cost: DeviceCost, device: PlanDevice,
                cache_dir: Path | None) -> str:
    rates = f"encoder {cost.encoder_flops_s / 1e9:.3g} GFLOP/s, prefill {cost.prefill_flops_s / 1e9:.3g} GFLOP/s"
    if found is None:
        where = cost_file(cache_dir) if cache_dir is not None else "no cost cache"
        return (f"  rates: the built-in guess for a {'GPU' if device.gpu else 'CPU'} ({rates}): no projector of "
                f"this shape and type\n  measured with {device.key} in {where} yet (the runtime measures it on "
                "its first image)")
    prefill = "" if cost.prefill_measured else " (prefill not measured yet: guessed)"
    return (f"  rates: measured on {cost.measured_on or 'an unknown date'} ({rates}){prefill}\n"
            f"  for a projector of this shape and type: {found[0]}")


def image_budget_plan(model_dir: Path, shapes: ModelShapes, n_ctx: int, quant: str = "f16",
                      mmproj_quant: str | None = None, *, latency_s: float, cache_dir: Path | None,
                      device: PlanDevice) -> str:
    """Tokens, grid and predicted encode + prefill seconds per detail level for --quant / --mmproj-quant,
    with the runtime's latency cut (this device's measured rates, else its guess) and memory cap."""
    e = estimate(shapes, quant, mmproj_quant, n_ctx)
    spec = hf_vision_spec(model_dir)
    if e.mmproj is not None:
        spec = replace(spec, weight_type=block_weight_type(
            (t.name, t.ggml_type.name, _elements(t.shape)) for t in e.mmproj.tensors))
    embd = next(t for t in e.text.tensors if t.name == "token_embd.weight")  # ggml order: (n_embd, n_vocab)
    n_params = sum(_elements(t.shape) for t in e.text.tensors)
    experts = [t for t in e.text.tensors if EXPERT_TENSOR in t.name]  # MoE: count the experts a token runs through
    if experts and shapes.experts_used:
        n_expert = experts[0].shape[2]
        n_params -= sum(_elements(t.shape) for t in experts) * (n_expert - shapes.experts_used) // n_expert
    flops_per_token = text_flops_per_token(n_params, n_vocab=embd.shape[1], n_embd=embd.shape[0])
    found = find_cost(cache_dir, device.key, spec.signature)
    cost = found[1] if found else DeviceCost.guess(device.gpu)
    mem = memory_tokens(spec, device.free_bytes)
    memory = ("free memory unknown: no cap" if mem is None else
              f"at most {mem} tokens (projector compute buffer in half of {device.free_bytes / 2**20:,.0f} MiB free)")
    lines = [f"\nImage budgets (--ctx-size {n_ctx}: at most {max(1, n_ctx // 2)} tokens an image; processor "
             f"{spec.min_tokens}..{spec.max_tokens} tokens of {spec.factor}x{spec.factor} pixels; text {e.quant}, "
             f"projector {e.mmproj_quant}; {device.key}):",
             _rates_line(found, cost, device, cache_dir),
             f"  auto: the largest budget predicted within --image-latency {latency_s:g} s, never below the "
             f"floor {auto_floor(spec)} tokens ({auto_floor(spec, 'text')} to read text, "
             f"{auto_floor(spec, 'grounding')} for boxes); memory: {memory}",
             f"  {'detail':7s} {'tokens':>12s}  "
             + "  ".join(f"{f'{w}x{h} {what}: grid, encode+prefill':>38s}" for w, h, what in PLAN_IMAGES)]
    for detail in DETAILS:
        plan = plan_for_context(detail, spec, n_ctx, cost, flops_per_token, latency_s, free_bytes=device.free_bytes)
        cells = []
        for w, h, _ in PLAN_IMAGES:
            rw, rh = plan.size_for((w, h))
            gw, gh = rw // spec.factor, rh // spec.factor
            seconds = cost.predict_s(spec, flops_per_token, gw * gh)
            cells.append(f"{f'{gw}x{gh} grid = {gw * gh} tokens, {_seconds(seconds)} s':>38s}")
        lines.append(f"  {detail:7s} {f'{plan.min_tokens}..{plan.max_tokens}':>12s}  " + "  ".join(cells))
        if detail == "auto":
            auto_reason = plan.reason
    lines.append(f"  why auto: {auto_reason}")
    return "\n".join(lines)
