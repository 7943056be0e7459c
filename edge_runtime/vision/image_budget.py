"""How many tokens each image gets: OpenAI's detail levels over a device-aware default.

`low` is a small fixed budget, `high` at least the grounding minimum, `auto` the
largest budget whose predicted encode + prefill time fits `image_latency_s` on
this device and whose projector compute buffer fits half its free memory (a FLOP model of the encoder and the text model, scaled by FLOP/s
rates measured on the first real encode and prefill, and kept on disk if asked).
Explicit image_min_tokens / image_max_tokens always win.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from edge_runtime.errors import OptionError
from edge_runtime.vision.resize import PixelBudget, target_size
from edge_runtime.vision.vision_spec import VisionSpec

log = logging.getLogger("edge_runtime")

__all__ = ["DETAILS", "DeviceCost", "ImagePlan", "Planner", "check_detail", "cost_key", "device_key", "find_cost",
           "idle_expert_params", "load_cost", "memory_tokens", "plan_for_context", "plan_image", "save_cost",
           "text_flops_per_token"]

DETAILS = ("low", "auto", "high")
LOW_MAX_TOKENS = 256
HIGH_MAX_TOKENS = 4096  # llama.cpp's own default budget
# Auto budgets come from this ladder (x1.5 / x1.33 steps): a device's budget is one of a few
# values, the same on every run once its rates are measured.
AUTO_LADDER = tuple(sorted({base << k for base in (16, 24) for k in range(12)}))
# auto's projector compute buffer may take this share of the device's free memory (read at
# load): the rest is headroom for the KV cache growing, other processes and the allocator.
MEMORY_SHARE = 0.5
# Before this device has been measured: conservative rates (a small 2-4 core CPU).
GUESS_CPU = (40e9, 120e9)
GUESS_GPU = (2e12, 4e12)
# The rates are measured once (the first encode, the first prefill of 32+ tokens) and then
# kept: a busy moment must not move a photo to another budget, and so out of the caches.


def check_detail(detail: str | None, where: str = "detail") -> str:
    value = "auto" if detail is None else detail
    if not isinstance(value, str) or value not in DETAILS:  # "" and False too: never a silent default
        raise OptionError(f"{where} must be one of {', '.join(DETAILS)}, got {detail!r}")
    return value


@dataclass(frozen=True)
class ImagePlan:
    """The budget chosen for one image and why (what last_stats and the server report)."""

    detail: str
    min_tokens: int
    max_tokens: int
    reason: str
    factor: int = 32  # pixels per side of one merged token

    @property
    def budget(self) -> PixelBudget:
        return PixelBudget.from_tokens(factor=self.factor, min_tokens=self.min_tokens, max_tokens=self.max_tokens)

    def size_for(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) an image of `size` is resized to (HF's smart_resize)."""
        return target_size(size, self.budget)


@dataclass
class DeviceCost:
    """FLOP/s of this device's vision encoder and text prefill, measured once (a guess before)."""

    encoder_flops_s: float
    prefill_flops_s: float
    measured: bool = False  # the encoder rate (what budgets mostly depend on)
    prefill_measured: bool = False
    projector: str = ""  # VisionSpec.signature of the projector measured (edge-convert --plan matches on it)
    measured_on: str = ""  # UTC date of the encoder measurement

    @classmethod
    def from_stored(cls, data: Any, where: Path | None = None) -> "DeviceCost | None":
        """The rates of one cost-file entry, or None (with a warning) when they are not positive
        finite numbers and flags: a damaged entry is measured again, never divided by."""
        try:
            cost = cls(**data)
        except TypeError:
            cost = None
        rates_ok = cost is not None and all(
            isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r > 0
            for r in (cost.encoder_flops_s, cost.prefill_flops_s))
        if not (rates_ok and isinstance(cost.measured, bool) and isinstance(cost.prefill_measured, bool)
                and isinstance(cost.projector, str) and isinstance(cost.measured_on, str)):
            log.warning("ignoring a damaged device cost entry in %s (rates must be positive numbers): "
                        "it is measured again", where)
            return None
        return cost

    @classmethod
    def guess(cls, gpu: bool) -> "DeviceCost":
        enc, pre = GUESS_GPU if gpu else GUESS_CPU
        return cls(enc, pre)

    def predict_s(self, spec: VisionSpec, text_flops_per_token: float, tokens: int) -> float:
        return (spec.encoder_flops(tokens) / self.encoder_flops_s
                + tokens * text_flops_per_token / self.prefill_flops_s)

    def record(self, kind: str, flops: float, seconds: float) -> bool:
        """Take the first measurement of `kind` ("encoder" or "prefill"); True if it was the first."""
        if seconds <= 0 or flops <= 0:
            return False
        if kind == "encoder" and not self.measured:
            self.encoder_flops_s, self.measured = flops / seconds, True
            self.measured_on = time.strftime("%Y-%m-%d", time.gmtime())
            return True
        if kind == "prefill" and not self.prefill_measured:
            self.prefill_flops_s, self.prefill_measured = flops / seconds, True
            return True
        return False

    def auto_tokens(self, spec: VisionSpec, text_flops_per_token: float, latency_s: float, ceiling: int) -> int:
        """The largest AUTO_LADDER budget (at least its first) predicted to fit latency_s."""
        best = AUTO_LADDER[0]
        for tokens in AUTO_LADDER:
            if tokens > ceiling or self.predict_s(spec, text_flops_per_token, tokens) > latency_s:
                break
            best = tokens
        return min(best, ceiling)


def text_flops_per_token(n_params: int, n_vocab: int, n_embd: int) -> float:
    """2 x the text model's matrix weights a prompt token passes through (the embedding table excluded).

    For an MoE model pass the active parameters (n_params - idle_expert_params)."""
    return 2.0 * max(n_params - n_vocab * n_embd, n_params // 2)


def idle_expert_params(meta: Callable[[str], str | None], arch: str) -> int:
    """Weights of the experts one token does not run through, from an MoE GGUF's metadata (0 when dense).

    Three matrices per expert (gate, up, down), as in llama.cpp's build_moe_ffn without shared experts.
    """
    def num(key: str) -> int:
        value = meta(f"{arch}.{key}")
        return int(value) if value else 0

    n_expert, used = num("expert_count"), num("expert_used_count")
    if n_expert <= 1 or not used:
        return 0
    return 3 * num("embedding_length") * num("expert_feed_forward_length") * num("block_count") * (n_expert - used)


def plan_image(
    detail: str,
    spec: VisionSpec,
    *,
    auto_tokens: int,
    ceiling: int,
    explicit_min: int | None = None,
    explicit_max: int | None = None,
) -> ImagePlan:
    """Token bounds for one image; `ceiling` is what the context can hold for it."""
    if detail == "low":
        lo, hi, why = spec.min_tokens, LOW_MAX_TOKENS, f"detail=low: at most {LOW_MAX_TOKENS} tokens"
    elif detail == "high":
        lo = spec.facts.grounding_min_tokens
        hi = max(lo, min(HIGH_MAX_TOKENS, spec.max_tokens))
        why = f"detail=high: {lo}..{hi} tokens (grounding / OCR)"
    else:
        hi = max(auto_tokens, spec.min_tokens)  # never below what the processor gives a tiny image
        lo = spec.min_tokens
        why = (f"detail=auto: {auto_tokens} tokens fit the latency target" if hi == auto_tokens else
               f"detail=auto: {auto_tokens} tokens fit the latency target, raised to the processor's minimum {hi}")
    if explicit_min is not None or explicit_max is not None:
        lo = explicit_min if explicit_min is not None else lo
        hi = explicit_max if explicit_max is not None else max(hi, lo)
        why = f"image_min_tokens/image_max_tokens: {lo}..{hi} tokens"
    if hi > ceiling:
        hi, why = max(1, ceiling), why + f"; capped at {ceiling} by the context"
    lo = min(lo, hi)
    return ImagePlan(detail, lo, hi, why, spec.factor)


def memory_tokens(spec: VisionSpec, free_bytes: int | None) -> int | None:
    """The most tokens whose projector compute buffer fits MEMORY_SHARE of `free_bytes` (None: no cap)."""
    per_token = spec.compute_bytes(1)
    if free_bytes is None or per_token <= 0:
        return None
    return max(1, int(free_bytes * MEMORY_SHARE) // per_token)


def plan_for_context(
    detail: str,
    spec: VisionSpec,
    n_ctx_seq: int,
    cost: DeviceCost | None,
    text_flops_per_token: float = 0.0,
    latency_s: float = 8.0,
    explicit_min: int | None = None,
    explicit_max: int | None = None,
    free_bytes: int | None = None,
    share: int = 1,
) -> ImagePlan:
    """The runtime's budget for one image in a sequence of `n_ctx_seq` tokens (half of it at most).
    `cost` None: no latency cut (a device not measured yet), auto is the largest ladder budget that fits.
    `free_bytes`: the projector device's free memory; auto's compute buffer stays within a share of it.
    `share`: the images of one message; at `auto` they split the latency target and the half context."""
    share = max(1, share)
    ceiling = max(1, n_ctx_seq // 2)
    top = min(max(1, ceiling // share), spec.max_tokens)
    mem = memory_tokens(spec, free_bytes)
    if mem is not None:
        top = min(top, mem)
    if cost is None:
        auto = min(max((t for t in AUTO_LADDER if t <= top), default=AUTO_LADDER[0]), top)
    else:
        auto = cost.auto_tokens(spec, text_flops_per_token, latency_s / share, top)
    plan = plan_image(detail, spec, auto_tokens=auto, ceiling=ceiling,
                      explicit_min=explicit_min, explicit_max=explicit_max)
    if detail == "auto" and share > 1 and explicit_min is None and explicit_max is None:
        plan = replace(plan, reason=plan.reason + f" (shared by the {share} images of the message)")
    if detail == "auto" and explicit_min is None and explicit_max is None and mem is not None and mem < ceiling:
        plan = replace(plan, reason=plan.reason + f"; at most {mem} by free memory ({free_bytes / 2**20:.0f} MiB)")
    return plan


@dataclass(frozen=True)
class Planner:
    """What an image's budget depends on, frozen: the engine plans with it, and edge-serve's HTTP
    process receives it (it pickles) to plan the images of a request the same way."""

    spec: VisionSpec
    n_ctx_seq: int
    cost: DeviceCost
    text_flops_per_token: float
    latency_s: float
    explicit_min: int | None = None
    explicit_max: int | None = None
    free_bytes: int | None = None

    def plan(self, detail: str = "auto", share: int = 1) -> ImagePlan:
        return plan_for_context(detail, self.spec, self.n_ctx_seq, self.cost, self.text_flops_per_token,
                                self.latency_s, self.explicit_min, self.explicit_max, self.free_bytes, share)


def cost_file(cache_dir: Path) -> Path:
    return cache_dir / "device-cost.json"


def device_key(threads: int, gpu: bool, gpu_layers: int) -> str:
    """How the runtime runs on this machine: the part of a cost key a plan for unconverted files can match."""
    return f"threads={threads}|gpu={int(gpu)}|layers={gpu_layers}"


def cost_key(model_path: Path, mmproj_path: Path, device: str) -> str:
    """The rates' key: this model pair (names and sizes) run this way on this device."""
    return f"{model_path.name}:{model_path.stat().st_size}|{mmproj_path.name}:{mmproj_path.stat().st_size}|{device}"


def _cost_table(cache_dir: Path | None) -> dict:
    if cache_dir is None:
        return {}
    try:
        table = json.loads(cost_file(cache_dir).read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def load_cost(cache_dir: Path | None, key: str, gpu: bool, projector: str = "") -> DeviceCost:
    """The stored rates for `key` (this model pair on this device), else a guess; `projector` is the
    signature of the projector they are (or will be) measured on."""
    stored = _cost_table(cache_dir).get(key)
    cost = (DeviceCost.from_stored(stored, cost_file(cache_dir)) if stored is not None and cache_dir else None)
    if cost is None:
        cost = DeviceCost.guess(gpu)
    if cost.projector:
        return cost
    cost = replace(cost, projector=projector)
    if projector and cost.measured:
        save_cost(cache_dir, key, cost)  # stored before signatures were: edge-convert --plan can match it now
    return cost


def find_cost(cache_dir: Path | None, device: str, projector: str) -> tuple[str, DeviceCost] | None:
    """The newest measured rates of a projector of this signature run this way on this device, with
    their key: what a model pair not converted yet would measure here (its text model may differ)."""
    found = []
    for key, data in _cost_table(cache_dir).items():
        cost = DeviceCost.from_stored(data, cost_file(cache_dir))
        if cost is not None and cost.measured and cost.projector == projector and key.endswith("|" + device):
            found.append((cost.measured_on, key, cost))
    return max(found, key=lambda f: (f[0], f[1]))[1:] if found else None


def save_cost(cache_dir: Path | None, key: str, cost: DeviceCost) -> None:
    if cache_dir is None or not cost.measured:
        return
    path = cost_file(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        table = _cost_table(cache_dir)
        table[key] = asdict(cost)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        tmp.write_text(json.dumps(table, indent=1))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache is no reason to fail an answer
        log.warning("could not store the device cost model in %s: %s", path, exc)
