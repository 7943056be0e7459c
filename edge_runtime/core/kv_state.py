"""What one KV-cache sequence holds, so a new prompt evaluates only what is new.

A sequence is a list of units kept or dropped whole: one unit per text token,
one per image (keyed by its content hash, so a prefix match stops at the image
boundary). Positions are tracked separately from token counts because with
M-RoPE an image of n tokens advances the position by max(grid w, grid h), not n.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence


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
