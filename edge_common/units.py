"""Human-readable sizes: a message about 3 MB must not read "0.00 GB"."""
from __future__ import annotations

_UNITS = ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB"))


def format_bytes(n: float) -> str:
    """Decimal units, three significant digits: 512 B, 3.00 MB, 12.4 GB, 150 GB."""
    for scale, unit in _UNITS:
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value >= 100 else f"{value:#.3g} {unit}"
    return f"{int(n)} B"
