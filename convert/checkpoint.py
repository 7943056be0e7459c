"""Read a Hugging Face checkpoint directory: config.json and safetensors shards.

Nothing here knows any architecture. Tensors are located from the shard headers
and read lazily through short-lived memory maps, so a multi-GB checkpoint is
never resident: each tensor (or row block of one) is mapped, decoded and dropped.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConvertError
from edge_common.floats import to_float32

INDEX_NAME = "model.safetensors.index.json"
ITEM_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes lie inside a shard."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the payload in `file`
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    def _map(self, start: int, stop: int) -> np.ndarray:
        return np.memmap(self.file, dtype=np.uint8, mode="r", offset=self.offset + start, shape=(stop - start,))

    def load(self) -> np.ndarray:
        """The whole tensor as float32 (a copy: the map is released on return)."""
        return self.load_rows(0, self.shape[0] if self.shape else 1)

    def load_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) along the first axis as float32."""
        shape = self.shape or (1,)
        row_bytes = self.nbytes // shape[0] if shape[0] else 0
        raw = self._map(start * row_bytes, stop * row_bytes)
        try:
            out = np.array(to_float32(raw, self.dtype), dtype=np.float32, copy=True)
        finally:
            del raw
        return out.reshape((stop - start,) + tuple(shape[1:])) if self.shape else out.reshape(())


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConvertError(f"{path}: {what} is missing. Point MODEL_DIR at a Hugging Face model folder that has it.")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: cannot read {what}: {e}") from e
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: {what} is not valid JSON ({e}); re-download it.") from e
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: {what} must hold a JSON object.")
    return data


def read_safetensors_header(path: Path) -> dict[str, TensorRef]:
    """Parse and validate one shard's header against the file's real size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConvertError(f"{path}: truncated safetensors file ({size} bytes); re-download it.")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise ConvertError(f"{path}: corrupt or truncated safetensors header; re-download the file.")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ConvertError(f"{path}: cannot read safetensors shard: {e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: corrupt safetensors header ({e}); re-download the file.") from e
    base = 8 + n
    tensors: dict[str, TensorRef] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise ConvertError(f"{path}: corrupt entry for tensor {name!r} in the header; re-download the file.") from e
        if dtype not in ITEM_SIZE:
            raise ConvertError(f"{path}: tensor {name!r} has unsupported dtype {dtype}.")
        expected = int(np.prod(shape, dtype=np.int64)) * ITEM_SIZE[dtype]
        if end - begin != expected or begin < 0:
            raise ConvertError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)}; the file is corrupt.")
        if base + end > size:
            raise ConvertError(
                f"{path}: truncated: tensor {name!r} ends at byte {base + end} but the file has {size}; re-download it."
            )
        tensors[name] = TensorRef(name, path, dtype, shape, base + begin, end - begin)
    check_disjoint(path, tensors.values())
    return tensors


def check_disjoint(path: Path, refs) -> None:
    """Two tensors sharing bytes would be read as each other's weights: the file is corrupt or forged."""
    spans = sorted((r.offset, r.offset + r.nbytes, r.name) for r in refs if r.nbytes)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ConvertError(f"{path}: tensors {n0!r} (bytes {b0}-{e0}) and {n1!r} (bytes {b1}-{e1}) overlap; "
                               "the file is corrupt, re-download it.")


@dataclass
class Checkpoint:
    """A checkpoint folder: its config and an index of every tensor."""

    model_dir: Path
    config: dict[str, Any]
    tensors: dict[str, TensorRef]

    @classmethod
    def open(cls, model_dir: str | Path) -> "Checkpoint":
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ConvertError(f"{model_dir}: not a directory. Give the folder of a Hugging Face checkpoint.")
        config = read_json(model_dir / "config.json", "config.json")
        return cls(model_dir, config, _index_tensors(model_dir))

    def json(self, name: str, what: str | None = None, *, required: bool = True) -> dict[str, Any]:
        path = self.model_dir / name
        if not required and not path.is_file():
            return {}
        return read_json(path, what or name)


def _index_tensors(model_dir: Path) -> dict[str, TensorRef]:
    index_path = model_dir / INDEX_NAME
    if index_path.is_file():
        index = read_json(index_path, INDEX_NAME)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError(f"{index_path}: has no 'weight_map'; re-download the index.")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (model_dir / shard).is_file():
                raise ConvertError(f"{model_dir / shard}: shard named by {INDEX_NAME} is missing; download it.")
        tensors: dict[str, TensorRef] = {}
        for shard in shards:
            tensors.update(read_safetensors_header(model_dir / shard))
        missing = [name for name, shard in weight_map.items() if name not in tensors or tensors[name].file.name != shard]
        if missing:
            raise ConvertError(
                f"{index_path}: names {len(missing)} tensor(s) absent from their shards (first: {missing[0]!r}); "
                "the index and shards do not match, re-download them."
            )
        return tensors
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        other = sorted(p.name for p in model_dir.glob("*.bin"))[:1]
        hint = f" (found {other[0]}: convert PyTorch .bin weights to safetensors first)" if other else ""
        raise ConvertError(f"{model_dir}: no *.safetensors weights found{hint}.")
    tensors = {}
    for shard in shards:
        tensors.update(read_safetensors_header(shard))
    return tensors
