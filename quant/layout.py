"""GGUF file sizes from a tensor list: header, key/values, tensor table, 32-byte aligned data.

The layout of gguf-py's GGUFWriter and llama.cpp's gguf.cpp (GGUF_DEFAULT_ALIGNMENT 32),
plus the keys llama-quantize adds (tools/quantize/quantize.cpp).
"""
from __future__ import annotations

from typing import Iterable

from edge_common.gguf_plan import TensorSize

ALIGN = 32  # GGUF_DEFAULT_ALIGNMENT


def _pad(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def tensor_info_bytes(t: TensorSize) -> int:
    return 8 + len(t.name.encode()) + 4 + 8 * len(t.shape) + 4 + 8


def gguf_file_bytes(metadata_bytes: int, tensors: Iterable[TensorSize]) -> int:
    """Header + key/values + tensor table, padded, + each tensor's data padded to 32 bytes."""
    ts = list(tensors)
    head = 24 + metadata_bytes + sum(tensor_info_bytes(t) for t in ts)
    return _pad(head) + sum(_pad(t.nbytes) for t in ts)


# llama-quantize adds general.quantization_version and general.file_type (u32 each).
QUANT_KEYS = (8 + len("general.quantization_version") + 4 + 4) + (8 + len("general.file_type") + 4 + 4)


def imatrix_keys(dataset: str = "builtin:synthetic-images+questions", path: str = "imatrix.gguf") -> int:
    def s(key: str, val: str) -> int:
        return 8 + len(key) + 4 + 8 + len(val)

    def u(key: str) -> int:
        return 8 + len(key) + 4 + 4

    return (s("quantize.imatrix.file", path) + s("quantize.imatrix.dataset", dataset)
            + u("quantize.imatrix.entries_count") + u("quantize.imatrix.chunks_count"))
