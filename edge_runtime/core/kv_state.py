"""What one KV-cache sequence holds, so a new prompt evaluates only what is new.

A sequence is a list of units kept or dropped whole: one unit per text token,
one per image (keyed by its content hash, so a prefix match stops at the image
boundary). Positions are tracked separately from token counts because with
M-RoPE an image of n tokens advances the position by max(grid w, grid h), not n.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Hashable, Sequence

from edge_runtime.errors import SavedConversationError


@dataclass(frozen=True)
class Unit:
    key: Hashable  # a text token id, or ("image", digest, n_tokens)
    n_tokens: int = 1
    n_pos: int = 1

    @property
    def is_image(self) -> bool:
        return isinstance(self.key, tuple)


def text_units(tokens: Sequence[int]) -> list[Unit]:
    return [Unit(int(t)) for t in tokens]


def image_unit(digest: str, n_tokens: int, n_pos: int) -> Unit:
    return Unit(("image", digest, n_tokens), n_tokens, n_pos)


def common_prefix(a: Sequence[Unit], b: Sequence[Unit]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i].key == b[i].key:
        i += 1
    return i


class SeqState:
    """Units in the KV cache for one sequence id, with their start positions."""

    def __init__(self) -> None:
        self.units: list[Unit] = []
        self._starts: list[int] = []  # position of each unit
        self.n_pos = 0  # next free position
        self.n_tokens = 0  # KV cells in use

    def __len__(self) -> int:
        return len(self.units)

    def pos_of(self, index: int) -> int:
        """Position where unit `index` starts (== n_pos when index == len)."""
        return self._starts[index] if index < len(self._starts) else self.n_pos

    def append(self, unit: Unit) -> None:
        self.units.append(unit)
        self._starts.append(self.n_pos)
        self.n_pos += unit.n_pos
        self.n_tokens += unit.n_tokens

    def extend(self, units: Sequence[Unit]) -> None:
        for unit in units:
            self.append(unit)

    def truncate(self, index: int) -> int:
        """Keep units [0, index); return the first position that was dropped."""
        pos = self.pos_of(index)
        dropped = self.units[index:]
        del self.units[index:]
        del self._starts[index:]
        self.n_pos = pos
        self.n_tokens -= sum(u.n_tokens for u in dropped)
        return pos

    def clear(self) -> None:
        self.truncate(0)

    def copy_from(self, other: "SeqState") -> None:
        """Hold what `other` holds (after its cells were copied to this sequence)."""
        self.units, self._starts = list(other.units), list(other._starts)
        self.n_pos, self.n_tokens = other.n_pos, other.n_tokens

    def image_digests(self) -> set[str]:
        return {u.key[1] for u in self.units if u.is_image}  # type: ignore[index]


def plan_reuse(cached: SeqState, wanted: Sequence[Unit]) -> int:
    """How many leading units of `wanted` can stay in the cache.

    At least the last unit is re-evaluated, because sampling needs its logits
    and llama.cpp only keeps the logits of the latest batch.
    """
    return max(0, min(common_prefix(cached.units, wanted), len(wanted) - 1))


@dataclass(frozen=True)
class StateFingerprint:
    """What KV cells depend on: the exact weights, the projector (image tokens), the cell types, and
    every other setting llama.cpp checks when it reads cells back (llama_kv_cache::state_read_data:
    layer count and row sizes follow the weights; the V layout follows flash attention), plus the
    chat template the history was rendered with (a restored history rendered by another template
    matches none of the saved cells, and its images have no pixels left to encode again).

    Not n_ctx: cells carry their positions, so a larger context takes them as they are.
    VisionChat has one stream (seq_id + 1 in general); `VisionChat(..., seq_id=N - 1)` matches `--parallel N`.
    """

    model_sha256: str
    mmproj_sha256: str | None
    arch: str
    kv_type_k: str
    kv_type_v: str
    image_min_tokens: int | None
    image_max_tokens: int | None
    kv_streams: int  # llama.cpp keeps one KV stream per sequence (n_seq_max): a server with --parallel N has N
    # "off" stores V transposed, "on" (also what "auto" stores) does not: llama.cpp refuses the other layout
    flash_attn: str
    chat_template: str  # sha256 of the template's source

    @classmethod
    def from_json(cls, data: Any) -> "StateFingerprint":
        if not isinstance(data, dict):
            raise SavedConversationError("the header has no 'depends_on' object")
        missing = [f.name for f in fields(cls) if f.name not in data]
        if missing:
            raise SavedConversationError(f"the header's 'depends_on' lacks {', '.join(map(repr, missing))} (saved by "
                                         "an older version?); save the conversation again with this one")
        values = {f.name: data[f.name] for f in fields(cls)}
        for name, value in values.items():
            if not _FIELD_CHECKS[name](value):
                raise SavedConversationError(f"the header's 'depends_on.{name}' is damaged (got {value!r}); "
                                             "save the conversation again")
        return cls(**values)

    def differences(self, other: "StateFingerprint") -> list[str]:
        """Human-readable 'name: saved X, here Y' for each field that differs."""
        out = []
        for f in fields(self):
            saved, here = getattr(self, f.name), getattr(other, f.name)
            if saved != here:
                out.append(f"{f.name}: saved {_short(saved)}, here {_short(here)}{_HINTS.get(f.name, '')}")
        return out


def flash_attn_layout(flash_attn_type: int, off: int) -> str:
    """The fingerprint's flash_attn: what llama.cpp's KV cache stores (only "off" transposes V)."""
    return "off" if flash_attn_type == off else "on"


def _is_count(value: Any, minimum: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= minimum


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


_FIELD_CHECKS = {
    "model_sha256": _is_digest,
    "mmproj_sha256": lambda v: v is None or _is_digest(v),
    "arch": lambda v: isinstance(v, str),
    "kv_type_k": lambda v: isinstance(v, str),
    "kv_type_v": lambda v: isinstance(v, str),
    "image_min_tokens": lambda v: v is None or _is_count(v, 1),
    "image_max_tokens": lambda v: v is None or _is_count(v, 1),
    "kv_streams": lambda v: _is_count(v, 1),
    "flash_attn": lambda v: v in ("on", "off"),
    "chat_template": _is_digest,
}

_HINTS = {
    "flash_attn": " (it decides the V cache layout; open it with the flash attention setting it was saved with: "
                  "flash_attn=False / -fa off for 'off', 'auto' or True for 'on')",
    "chat_template": " (the chat template differs; open it with the chat_template it was saved with)",
}


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64:
        return value[:12] + "..."
    return repr(value)
