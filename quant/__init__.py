"""Quantization for the edge runtime: llama.cpp's types for the text model, ggml's quantizer for the
projector, importance matrices from images and text, size/memory planning and quality measurement.

Light imports only here: torch and transformers load inside the functions that need them
(imatrix_compute.compute_imatrix), llama_cpp inside the quantizers, so the runtime installs without them.
"""
from .catalog import QuantType, lookup, lookup_projector, names, projector_names
from .errors import QuantError

__all__ = ["QuantError", "QuantType", "lookup", "lookup_projector", "names", "projector_names",
           "evaluate", "quantize_text", "quantize_mmproj", "compute_imatrix"]


def __getattr__(name: str):
    """quant.evaluate(...) etc. without importing every module up front (sizes: quant.estimate.estimate)."""
    if name == "evaluate":
        from .quality import evaluate

        return evaluate
    if name == "quantize_text":
        from .text import quantize_text

        return quantize_text
    if name == "quantize_mmproj":
        from .mmproj import quantize_mmproj

        return quantize_mmproj
    if name == "compute_imatrix":
        from .imatrix_compute import compute_imatrix

        return compute_imatrix
    raise AttributeError(name)
