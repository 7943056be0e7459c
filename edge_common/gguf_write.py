"""Write a GGUF file tensor by tensor, never holding the model in memory.

gguf-py's GGUFWriter writes the header, metadata and tensor table; the payloads
are streamed here in row blocks. The file appears under its final name only
once complete (temp name + rename), so an interrupted run leaves nothing that
looks finished.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from tqdm import tqdm

from .atomic import atomic_output
from .floats import f32_to_bf16_bits

_STORAGE = {  # numpy storage of each float type inside the file
    GGMLQuantizationType.F32: np.dtype("<f4"),
    GGMLQuantizationType.F16: np.dtype("<f2"),
    GGMLQuantizationType.BF16: np.dtype("<u2"),
}


class OutputTensor(Protocol):
    """What write_gguf needs of a tensor: its table entry and its payload, already encoded."""

    name: str
    shape: tuple[int, ...]  # outermost first (numpy order)
    ggml_type: GGMLQuantizationType

    @property
    def nbytes(self) -> int: ...

    def encoded_blocks(self) -> Iterator[np.ndarray]: ...


@dataclass(frozen=True)
class FloatTensor:
    """One tensor of the output: its name, shape (outermost first), type, and a
    producer of float32 row blocks that concatenate along axis 0 to the tensor."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    blocks: Callable[[], Iterator[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _STORAGE[self.ggml_type].itemsize

    def encoded_blocks(self) -> Iterator[np.ndarray]:
        return (encode(block, self.ggml_type) for block in self.blocks())


def encode(block: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    if ggml_type == GGMLQuantizationType.BF16:
        return f32_to_bf16_bits(block)
    return np.ascontiguousarray(block, dtype=_STORAGE[ggml_type])


def write_gguf(
    path: Path,
    arch: str,
    set_metadata: Callable[[GGUFWriter], None],
    tensors: Sequence[OutputTensor],
    *,
    progress: bool = True,
) -> int:
    """Write `path` atomically, streaming each tensor's blocks; returns its size in bytes."""
    with atomic_output(path) as tmp:
        writer = GGUFWriter(tmp, arch)
        try:
            set_metadata(writer)
            for t in tensors:
                writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.ggml_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            fout = writer.fout[0]
            total = sum(t.nbytes for t in tensors)
            with tqdm(total=total, unit="B", unit_scale=True, desc=path.name, disable=not progress, leave=False) as bar:
                for t in tensors:
                    writer.write_padding(fout, fout.tell())
                    written = 0
                    for data in t.encoded_blocks():
                        data.tofile(fout)
                        written += data.nbytes
                        bar.update(data.nbytes)
                    if written != t.nbytes:
                        raise RuntimeError(f"{t.name}: produced {written} bytes, planned {t.nbytes}")
                    writer.write_padding(fout, t.nbytes)
            fout.flush()
            os.fsync(fout.fileno())
        finally:
            writer.close()
    return path.stat().st_size
