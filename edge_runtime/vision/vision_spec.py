"""What the runtime needs to know about a projector, read from its GGUF metadata.

The image grid (patch x merge), the processor's pixel bounds and the encoder's
shape (for its cost) come from the `clip.vision.*` keys, so nothing here is
specific to one model; missing keys fall back to the values of the projector's
family (edge_models' registry, by clip.projector_type), which also gives what no
GGUF carries (the grounding minimum, the compute-buffer formula).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from gguf import GGUFReader, Keys

from edge_models import VisionFacts, family_for_gguf, family_for_hf, family_for_projector

from edge_runtime.vision.resize import PixelBudget, target_size
from edge_models import ModelConfigError

__all__ = ["VisionSpec", "block_weight_type", "hf_vision_spec", "read_vision_spec"]


@dataclass(frozen=True)
class VisionSpec:
    patch_size: int
    merge_size: int
    min_tokens: int  # the processor's bounds (clip.vision.image_min/max_pixels)
    max_tokens: int
    hidden: int = 0
    ff: int = 0
    depth: int = 0
    out_dim: int = 0
    deepstack: int = 0  # layers whose features are merged into extra outputs
    weight_type: str = ""  # ggml type of most encoder block weights ("" unknown): sets the encoder's speed
    # what its family knows that no GGUF key says (grounding minimum, compute-buffer formula)
    facts: VisionFacts = field(default_factory=lambda: family_for_gguf().vision, repr=False)

    @property
    def signature(self) -> str:
        """Shape and type of the encoder: projectors alike in these run at the same FLOP/s on one device."""
        return (f"patch={self.patch_size}x{self.merge_size}|hidden={self.hidden}|ff={self.ff}|depth={self.depth}"
                f"|out={self.out_dim}|deepstack={self.deepstack}|type={self.weight_type}")

    @property
    def factor(self) -> int:
        """Pixels per side of one merged image token."""
        return self.patch_size * self.merge_size

    def budget(self, min_tokens: int, max_tokens: int) -> PixelBudget:
        return PixelBudget.from_tokens(factor=self.factor, min_tokens=min_tokens, max_tokens=max_tokens)

    def native_tokens(self, size: tuple[int, int]) -> int:
        """Tokens the model's own processor gives an image of `size` (width, height) at its max_pixels:
        what the model was trained to see, the measure of a budget's fidelity."""
        w, h = target_size(size, self.budget(self.min_tokens, self.max_tokens))
        return (w // self.factor) * (h // self.factor)

    def compute_bytes(self, tokens: int) -> int:
        """The projector's compute buffer for one image of `tokens` merged tokens (0: shape unknown)."""
        if not (self.hidden and self.ff):
            return 0
        return self.facts.projector_compute_bytes(tokens * self.merge_size ** 2, self.hidden, self.ff)

    def encoder_flops(self, tokens: int) -> float:
        """Multiply-adds x 2 of one encode of `tokens` merged tokens (linear layers + attention + mergers)."""
        patches = tokens * self.merge_size ** 2
        d, f = self.hidden, self.ff
        per_layer = patches * 2 * (4 * d * d + 2 * d * f) + 4 * patches * patches * d
        embed = patches * 2 * (3 * 2 * self.patch_size ** 2) * d
        merged = d * self.merge_size ** 2
        mergers = tokens * 2 * (merged * merged + merged * self.out_dim) * (1 + self.deepstack)
        return float(self.depth * per_layer + embed + mergers)


def block_weight_type(tensors: Iterable[tuple[str, str, int]]) -> str:
    """The ggml type holding most elements of the encoder blocks (`v.blk.*`), from (name, type, elements)."""
    count: Counter[str] = Counter()
    for name, type_name, n in tensors:
        if name.startswith("v.blk."):
            count[type_name.lower()] += int(n)
    return count.most_common(1)[0][0] if count else ""


def read_vision_spec(path: str | Path) -> VisionSpec:
    """The projector's VisionSpec (ValueError naming the file if it is not a vision projector)."""
    reader = GGUFReader(str(path))

    def value(key: str, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    v = Keys.ClipVision
    facts = family_for_projector(value(Keys.Clip.PROJECTOR_TYPE)).vision
    patch = int(value(v.PATCH_SIZE, facts.patch_size))
    merge = int(value(v.SPATIAL_MERGE_SIZE, facts.merge_size))
    area = (patch * merge) ** 2
    min_px, max_px = value(v.IMAGE_MIN_PIXELS), value(v.IMAGE_MAX_PIXELS)
    deep = value(v.IS_DEEPSTACK_LAYERS) or []
    return VisionSpec(
        patch_size=patch,
        merge_size=merge,
        min_tokens=max(1, int(min_px) // area) if min_px else facts.min_tokens,
        max_tokens=max(1, int(max_px) // area) if max_px else facts.max_tokens,
        hidden=int(value(v.EMBEDDING_LENGTH, 0)),
        ff=int(value(v.FEED_FORWARD_LENGTH, 0)),
        depth=int(value(v.BLOCK_COUNT, 0)),
        out_dim=int(value(Keys.ClipVision.PROJECTION_DIM, 0)),
        deepstack=sum(bool(x) for x in deep),
        weight_type=block_weight_type((t.name, t.tensor_type.name, int(t.n_elements)) for t in reader.tensors),
        facts=facts,
    )


def hf_vision_spec(model_dir: str | Path) -> VisionSpec:
    """The grid, pixel bounds and encoder shape of a Hugging Face checkpoint (config.json's vision_config
    and preprocessor_config.json: what the converter writes as clip.vision.*), before any GGUF exists.
    The weight type is the converter's choice, not the checkpoint's: left unknown here."""
    def load(name: str) -> dict:
        path = Path(model_dir) / name
        try:
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, ValueError) as exc:
            raise ModelConfigError(f"{path}: unreadable ({exc}); restore the checkpoint's {name}") from exc

    config, pre = load("config.json"), load("preprocessor_config.json")
    facts = family_for_hf(config, str(Path(model_dir) / "config.json")).vision
    vc = config.get("vision_config") or {}
    patch = int(vc.get("patch_size") or pre.get("patch_size") or facts.patch_size)
    merge = int(vc.get("spatial_merge_size") or pre.get("merge_size") or facts.merge_size)
    area = (patch * merge) ** 2
    size = pre.get("size") or {}
    min_px = size.get("shortest_edge", pre.get("min_pixels"))
    max_px = size.get("longest_edge", pre.get("max_pixels"))
    return VisionSpec(
        patch_size=patch,
        merge_size=merge,
        min_tokens=max(1, int(min_px) // area) if min_px else facts.min_tokens,
        max_tokens=max(1, int(max_px) // area) if max_px else facts.max_tokens,
        hidden=int(vc.get("hidden_size") or 0),
        ff=int(vc.get("intermediate_size") or 0),
        depth=int(vc.get("depth") or 0),
        out_dim=int(vc.get("out_hidden_size") or 0),
        deepstack=len(vc.get("deepstack_visual_indexes") or ()),
        facts=facts,
    )
