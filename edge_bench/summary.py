"""Median and spread of repeated measurements.

The median resists the odd slow run on a shared machine; the spread (half the
range) says how much to trust it. Kept separate from the workers so every
figure, baseline or not, is summarised the same way.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class Summary:
    median: float
    min: float
    max: float
    n: int

    @property
    def spread(self) -> float:
        """Half the range: the median is within +-spread of every run."""
        return (self.max - self.min) / 2

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spread": self.spread}


def summarize(samples: Sequence[float]) -> Summary:
    if not samples:
        # a plain ValueError: every party measures at least once: a programming error
        raise ValueError("no samples to summarise")
    values = [float(v) for v in samples]
    return Summary(statistics.median(values), min(values), max(values), len(values))


def summarize_all(samples: Mapping[str, Sequence[float]]) -> dict[str, Summary]:
    """Every figure with at least one sample."""
    return {name: summarize(values) for name, values in samples.items() if values}


def ratio(a: Summary | float | None, b: Summary | float | None) -> float | None:
    """a / b on medians; None when either side is missing or b is zero."""
    av = a.median if isinstance(a, Summary) else a
    bv = b.median if isinstance(b, Summary) else b
    if av is None or bv is None or bv == 0:
        return None
    return av / bv


def decode_rates(times: Sequence[float]) -> tuple[float, float] | None:
    """(1 / median gap, mean rate) of tokens produced at `times`; None below 3 tokens.

    The first figure is the decode rate the report uses: one burst of another
    process on a shared machine stretches a few gaps, which moves the mean but
    not the median gap. The mean, (n - 1) / (last - first), is kept beside it.
    """
    if len(times) < 3 or times[-1] <= times[0]:
        return None
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    median_gap = statistics.median(gaps)
    mean = (len(times) - 1) / (times[-1] - times[0])
    return (1.0 / median_gap if median_gap > 0 else mean), mean
