"""Hugging Face checkpoint -> llama.cpp float GGUF pair (text model + projector) + manifest."""
from edge_common import __version__

from .errors import ConvertError
from .pipeline import ConvertOptions, convert_checkpoint

__all__ = ["ConvertError", "ConvertOptions", "convert_checkpoint", "__version__"]
