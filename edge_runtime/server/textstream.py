"""Generated tokens -> the text a client sees, exactly as `VisionChat` shows it (one pipeline for both)."""
from __future__ import annotations

from ..detokenize import TextPipeline

__all__ = ["TextPipeline"]
