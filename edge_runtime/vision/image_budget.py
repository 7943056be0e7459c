"""How many tokens each image gets: OpenAI's detail levels over a device-aware default.

`low` is a small fixed budget, `high` at least the grounding minimum, `auto` the
largest budget whose predicted encode + prefill time fits `image_latency_s` on
this device and whose projector compute buffer fits half its free memory (a FLOP
model of the encoder and the text model, scaled by FLOP/s rates this device
measured: a sub-second calibration at load, then the first real encode and
prefill; kept in the user cache dir for the next process).

`auto` never goes below a fidelity floor (AUTO_FLOORS): 256 tokens for any image,
the grounding minimum when the answer is boxes, 1024 when the question reads text.
The latency target is a target: where the floor cannot meet it, the plan keeps the
floor and says so (`ImagePlan.meets_target`, in stats, the server's usage and
`edge-convert --plan`); only the context and free memory cap a budget below it.
Explicit image_min_tokens / image_max_tokens always win.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from edge_runtime.errors import OptionError
from edge_runtime.vision.resize import PixelBudget, target_size
from edge_runtime.vision.vision_spec import VisionSpec

log = logging.getLogger("edge_runtime")

__all__ = ["AUTO_FLOORS", "DETAILS", "NEEDS", "DeviceCost", "ImagePlan", "PlannedImage", "Planner", "auto_floor", "check_detail",
           "cost_key", "device_key", "find_cost", "idle_expert_params", "image_need", "load_cost", "memory_tokens",
           "plan_for_context", "plan_image", "save_cost", "text_flops_per_token"]

DETAILS = ("low", "auto", "high")
LOW_MAX_TOKENS = 256
HIGH_MAX_TOKENS = 4096  # llama.cpp's own default budget
# Auto budgets come from this ladder (x1.5 / x1.33 steps): a device's budget is one of a few
# values, the same on every run once its rates are measured.
AUTO_LADDER = tuple(sorted({base << k for base in (16, 24) for k in range(12)}))
# auto's projector compute buffer may take this share of the device's free memory (read at
# load): the rest is headroom for the KV cache growing, other processes and the allocator.
MEMORY_SHARE = 0.5
# What an answer needs to see: "" (a look at the picture), "text" (reading it), "grounding" (boxes).
NEEDS = ("", "text", "grounding")
# auto's fidelity floor per need, in tokens. 256: below it a phone photo is a thumbnail (the model
# was trained up to 16384). Reading text and boxes need more; "grounding" is the projector family's
# grounding minimum (1024 for Qwen3-VL, where llama.cpp warns grounding suffers), given by auto_floor.
AUTO_FLOORS = {"": 256, "text": 1024, "grounding": 1024}
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
    floor: int = 0  # auto's fidelity floor for this image (0: not auto)
    need: str = ""  # what the answer needs to see (NEEDS)
    predicted_s: float | None = None  # encode + prefill of max_tokens on this device (None: no cost model)
    target_s: float | None = None  # the latency target this image had (its share of image_latency_s)
    rates: str = ""  # where the device's rates came from: DeviceCost.source ("" without a cost model)
    cap: int = 0  # the most tokens the floor may lift an image to (the context's share, free memory)

    @property
    def meets_target(self) -> bool | None:
        """Whether max_tokens is predicted to fit the latency target (None: nothing to predict with)."""
        if self.predicted_s is None or self.target_s is None:
            return None
        return self.predicted_s <= self.target_s

    def report(self) -> dict[str, Any]:
        """The plan's figures for stats and the server's usage (what a UI shows before an answer)."""
        return {"detail": self.detail, "min_tokens": self.min_tokens, "max_tokens": self.max_tokens,
                "floor": self.floor, "need": self.need,
                "predicted_s": None if self.predicted_s is None else round(self.predicted_s, 3),
                "target_s": self.target_s, "meets_target": self.meets_target, "rates": self.rates,
                "reason": self.reason}

    @property
    def budget(self) -> PixelBudget:
        return PixelBudget.from_tokens(factor=self.factor, min_tokens=self.min_tokens, max_tokens=self.max_tokens)

    def size_for(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) an image of `size` is resized to (HF's smart_resize), with at least `floor`
        tokens where the image has them: a 4:3 photo fits 234 tokens into a 256 budget (18x13), so the
        budget is widened a grid row at a time (19x14 = 266) up to `cap`."""
        w, h = target_size(size, self.budget)
        if not self.floor or self._cells(w, h) >= self.floor or self.cap <= self.max_tokens:
            return w, h

        def at(top: int) -> tuple[int, int]:
            return target_size(size, PixelBudget.from_tokens(factor=self.factor, min_tokens=self.min_tokens,
                                                             max_tokens=top))

        if self._cells(*at(self.cap)) < self.floor:
            return w, h  # the image is smaller than the floor (never enlarged), or the cap holds it
        return next(wider for top in range(self.max_tokens + 1, self.cap + 1)
                    if self._cells(*(wider := at(top))) >= self.floor)

    def _cells(self, w: int, h: int) -> int:
        return (w // self.factor) * (h // self.factor)


@dataclass(frozen=True)
class PlannedImage:
    """What asking about one image will cost, known before asking (VisionChat.plan_image)."""

    plan: ImagePlan
    tokens: int  # the image's tokens at this plan (its grid's cells)
    grid: tuple[int, int]
    size: tuple[int, int]  # (width, height) the image is resized to
    source_size: tuple[int, int] | None
    predicted_s: float  # encode + prefill of these tokens on this device

    @property
    def meets_target(self) -> bool:
        """Whether the predicted seconds fit the latency target (the floor may keep them above it)."""
        return self.plan.target_s is None or self.predicted_s <= self.plan.target_s


@dataclass
class DeviceCost:
    """FLOP/s of this device's vision encoder and text prefill: a guess, then a calibration at load,
    then the first real encode and prefill (each kind replaces a calibration once, then stays)."""

    encoder_flops_s: float
    prefill_flops_s: float
    measured: bool = False  # the encoder rate (what budgets mostly depend on)
    prefill_measured: bool = False
    projector: str = ""  # VisionSpec.signature of the projector measured (edge-convert --plan matches on it)
    measured_on: str = ""  # UTC date of the encoder measurement
    # the rate came from the load-time calibration (a small image): the first real one replaces it
    encoder_calibrated: bool = False
    prefill_calibrated: bool = False

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
        flags = () if cost is None else (cost.measured, cost.prefill_measured, cost.encoder_calibrated,
                                         cost.prefill_calibrated)
        if not (rates_ok and all(isinstance(f, bool) for f in flags)
                and isinstance(cost.projector, str) and isinstance(cost.measured_on, str)):
            log.warning("ignoring a damaged device cost entry in %s (rates must be positive numbers): "
                        "it is measured again", where)
            return None
        return cost

    @classmethod
    def guess(cls, gpu: bool) -> "DeviceCost":
        enc, pre = GUESS_GPU if gpu else GUESS_CPU
        return cls(enc, pre)

    @property
    def source(self) -> str:
        """Where the encoder rate comes from: "guess", "calibration" or "measured"."""
        return "guess" if not self.measured else "calibration" if self.encoder_calibrated else "measured"

    def predict_s(self, spec: VisionSpec, text_flops_per_token: float, tokens: int) -> float:
        return (spec.encoder_flops(tokens) / self.encoder_flops_s
                + tokens * text_flops_per_token / self.prefill_flops_s)

    def record(self, kind: str, flops: float, seconds: float, calibration: bool = False) -> bool:
        """Take the first measurement of `kind` ("encoder" or "prefill"): a calibration (taken only
        where nothing was measured) or the first real one (which replaces a calibration); True if taken."""
        if seconds <= 0 or flops <= 0:
            return False
        if kind == "encoder" and (not self.measured or (self.encoder_calibrated and not calibration)):
            self.encoder_flops_s, self.measured, self.encoder_calibrated = flops / seconds, True, calibration
            self.measured_on = time.strftime("%Y-%m-%d", time.gmtime())
            return True
        if kind == "prefill" and (not self.prefill_measured or (self.prefill_calibrated and not calibration)):
            self.prefill_flops_s, self.prefill_measured, self.prefill_calibrated = flops / seconds, True, calibration
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


# The keys a grounding answer's items carry (Qwen's bbox_2d / point_2d and their short forms): a
# json_schema naming one asks for boxes or points.
GROUNDING_KEYS = ("bbox_2d", "bbox", "box_2d", "point_2d", "point")
_GROUNDING_WORDS = re.compile(r"\b(bbox(_2d)?|bounding[ -]box(es)?|box_2d|point_2d|locate|locali[sz]e|grounding)\b",
                              re.IGNORECASE)
_TEXT_WORDS = re.compile(r"\b(read|reading|transcribe|transcription|ocr|written|handwrit\w*|extract (the |all )?text"
                         r"|what does (it|this|that|the \w+) say)\b", re.IGNORECASE)


def _schema_keys(schema: Any) -> set[str]:
    """Every property name anywhere in a JSON schema (or any JSON value)."""
    if isinstance(schema, dict):
        found = set(schema.get("properties", {})) if isinstance(schema.get("properties"), dict) else set()
        for value in schema.values():
            found |= _schema_keys(value)
        return found
    if isinstance(schema, list):
        return set().union(*(_schema_keys(v) for v in schema)) if schema else set()
    return set()


def image_need(text: str = "", schema: Any = None) -> str:
    """What an answer needs to see of its images (NEEDS), from the question and the answer's schema:
    "grounding" when the schema has box/point keys or the question asks to locate (the page's Locate
    mode sends both), "text" when it asks to read or transcribe, else "". English keywords only: a
    caller who knows better says detail="high"."""
    if isinstance(schema, str):  # a schema given as JSON text
        try:
            schema = json.loads(schema)
        except ValueError:
            schema = None
    if _schema_keys(schema) & set(GROUNDING_KEYS) or _GROUNDING_WORDS.search(text or ""):
        return "grounding"
    return "text" if _TEXT_WORDS.search(text or "") else ""


def auto_floor(spec: VisionSpec, need: str = "") -> int:
    """auto's fewest tokens for an image whose answer has `need` (AUTO_FLOORS; the family's grounding
    minimum for boxes), never below what the processor gives a tiny image."""
    if need not in NEEDS:
        raise OptionError(f"need must be one of {', '.join(repr(n) for n in NEEDS)}, got {need!r}")
    floor = spec.facts.grounding_min_tokens if need == "grounding" else AUTO_FLOORS[need]
    return max(floor, spec.min_tokens)


def plan_image(
    detail: str,
    spec: VisionSpec,
    *,
    auto_tokens: int,
    ceiling: int,
    explicit_min: int | None = None,
    explicit_max: int | None = None,
    floor: int = 0,
) -> ImagePlan:
    """Token bounds for one image; `ceiling` is what the context can hold for it; `floor`: auto's
    fidelity floor (auto_tokens is raised to it)."""
    if detail == "low":
        lo, hi, why = spec.min_tokens, LOW_MAX_TOKENS, f"detail=low: at most {LOW_MAX_TOKENS} tokens"
    elif detail == "high":
        lo = spec.facts.grounding_min_tokens
        hi = max(lo, min(HIGH_MAX_TOKENS, spec.max_tokens))
        why = f"detail=high: {lo}..{hi} tokens (grounding / OCR)"
    else:
        hi = max(auto_tokens, spec.min_tokens, floor)
        lo = spec.min_tokens
        why = (f"detail=auto: {auto_tokens} tokens fit the latency target" if hi == auto_tokens else
               f"detail=auto: {auto_tokens} tokens fit the latency target, raised to the floor {hi}")
    if explicit_min is not None or explicit_max is not None:
        lo = explicit_min if explicit_min is not None else lo
        hi = explicit_max if explicit_max is not None else max(hi, lo)
        why = f"image_min_tokens/image_max_tokens: {lo}..{hi} tokens"
    if hi > ceiling:
        hi, why = max(1, ceiling), why + f"; capped at {ceiling} by the context"
    lo = min(lo, hi)
    return ImagePlan(detail, lo, hi, why, spec.factor, floor=floor if detail == "auto" else 0)


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
    need: str = "",
) -> ImagePlan:
    """The runtime's budget for one image in a sequence of `n_ctx_seq` tokens (half of it at most).
    `cost` None: no latency cut (a device not measured yet), auto is the largest ladder budget that fits.
    `free_bytes`: the projector device's free memory; auto's compute buffer stays within a share of it.
    `share`: the images of one message; at `auto` they split the latency target and the half context,
    each keeping the fidelity floor of `need` (see auto_floor)."""
    share = max(1, share)
    ceiling = max(1, n_ctx_seq // 2)
    top = min(max(1, ceiling // share), spec.max_tokens)
    mem = memory_tokens(spec, free_bytes)
    if mem is not None:
        top = min(top, mem)
    target = latency_s / share
    if cost is None:
        auto = min(max((t for t in AUTO_LADDER if t <= top), default=AUTO_LADDER[0]), top)
    else:
        auto = cost.auto_tokens(spec, text_flops_per_token, target, top)
    floor = auto_floor(spec, need)
    explicit = explicit_min is not None or explicit_max is not None
    # the floor yields only to what cannot be had: the context's share and free memory (then the ladder)
    plan = plan_image(detail, spec, auto_tokens=auto, ceiling=ceiling, explicit_min=explicit_min,
                      explicit_max=explicit_max, floor=floor if floor <= top else 0)
    if detail == "auto" and not explicit:
        plan = replace(plan, floor=floor, cap=top)
    notes = []
    if detail == "auto" and not explicit:
        if share > 1:
            notes.append(f"shared by the {share} images of the message")
        if need:
            notes.append(f"floor {floor} for {need}")
        if floor > top:
            notes.append(f"floor {floor} cut to {top} by the context and free memory")
        if mem is not None and mem < ceiling:
            notes.append(f"at most {mem} by free memory ({free_bytes / 2**20:.0f} MiB)")
    predicted = cost.predict_s(spec, text_flops_per_token, plan.max_tokens) if cost is not None else None
    plan = replace(plan, need=need, predicted_s=predicted, target_s=target, rates=cost.source if cost else "")
    if detail == "auto" and not explicit and plan.meets_target is False:
        notes.append(f"predicted {predicted:.1f} s: over the {target:.1f} s target (the floor is kept)")
    if notes:
        plan = replace(plan, reason=plan.reason + " (" + "; ".join(notes) + ")")
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

    def plan(self, detail: str = "auto", share: int = 1, need: str = "") -> ImagePlan:
        return plan_for_context(detail, self.spec, self.n_ctx_seq, self.cost, self.text_flops_per_token,
                                self.latency_s, self.explicit_min, self.explicit_max, self.free_bytes, share, need)

    def predict_s(self, tokens: int) -> float:
        """Encode + prefill seconds of an image of `tokens` on this device, as the cost model stands."""
        return self.cost.predict_s(self.spec, self.text_flops_per_token, tokens)


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
