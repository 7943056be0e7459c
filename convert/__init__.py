"""Hugging Face Qwen3-VL checkpoint -> llama.cpp GGUF pair (text model + projector)."""
__version__ = "0.1.0"

from .errors import ConvertError  # noqa: E402
from .pipeline import ConvertOptions, convert_checkpoint  # noqa: E402

__all__ = ["ConvertError", "ConvertOptions", "convert_checkpoint", "__version__"]
