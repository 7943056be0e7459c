"""Importance matrices: llama.cpp's file formats (read, write); checks are in imatrix_check, computing in imatrix_compute.

An importance matrix holds, for every weight matrix, the sum of squared input
activations per input column (and how many rows were summed). Low-bit
quantizers weight their rounding error by it, so columns that carry large
activations keep more precision. llama.cpp's llama-imatrix only sees text; for
a vision-language model we run the transformers reference model over prompts
with images, so the projector and the text layers that read image tokens are
calibrated on what they will really see.

Formats (tools/imatrix/imatrix.cpp, common/imatrix-loader.cpp):
- GGUF: `general.type = "imatrix"`, `imatrix.datasets` (string array),
  `imatrix.chunk_count` / `imatrix.chunk_size` (u32); per weight `NAME.in_sum2`
  (F32, ne = [n_cols, n_mat]) and `NAME.counts` (F32, ne = [1, n_mat]).
- legacy .dat: int32 n_entries; per entry int32 len, name, int32 ncall,
  int32 nval, float[nval] = mean * ncall; then optional int32 chunk count,
  int32 len, dataset name.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from edge_common.atomic import atomic_output

from .errors import QuantError

KV_DATASETS = "imatrix.datasets"
KV_CHUNK_COUNT = "imatrix.chunk_count"
KV_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"


@dataclass
class ImatrixEntry:
    """Accumulated statistics of one weight: sums [n_mat, n_cols], counts [n_mat]."""

    sums: np.ndarray
    counts: np.ndarray

    @property
    def n_cols(self) -> int:
        return int(self.sums.shape[-1])

    def values(self, legacy: bool = False) -> np.ndarray:
        """Mean squared activation per column, flattened, as llama-quantize computes it."""
        sums = self.sums.reshape(len(self.counts), -1).astype(np.float32)
        out = np.empty_like(sums)
        for j, c in enumerate(self.counts):
            if c > 0:
                out[j] = sums[j] / np.float32(c)
            else:  # no data: GGUF readers use 1 (neutral), legacy ones the raw sums
                out[j] = sums[j] if legacy else 1.0
        return out.reshape(-1)


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry]
    datasets: tuple[str, ...] = ()
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False
    path: Path | None = None  # where it was loaded from or saved to

    def values(self, name: str) -> np.ndarray | None:
        e = self.entries.get(name)
        return None if e is None else e.values(self.legacy)

    def subset(self, names: Iterable[str]) -> "Imatrix":
        keep = set(names)
        return Imatrix({k: v for k, v in self.entries.items() if k in keep}, self.datasets,
                       self.chunk_count, self.chunk_size, self.legacy, self.path)

    @property
    def label(self) -> str:
        return str(self.path) if self.path else (self.datasets[0] if self.datasets else "imatrix")


# --- file formats ---------------------------------------------------------------

def load(path: str | Path) -> Imatrix:
    """Read an imatrix file written by llama-imatrix (GGUF or legacy .dat) or by save()."""
    path = Path(path)
    if not path.is_file():
        raise QuantError(f"{path}: imatrix file not found; pass --imatrix auto to compute one, "
                         "or a file written by llama-imatrix.")
    with open(path, "rb") as f:
        magic = f.read(4)
    try:
        im = _load_gguf(path) if magic == b"GGUF" else _load_legacy(path)
    except QuantError:
        raise
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, struct.error, OSError) as exc:
        # gguf-py's reader and numpy fail on damaged files with their own messages
        raise QuantError(f"{path}: damaged or truncated imatrix file ({type(exc).__name__}: {exc}); "
                         "recompute it with --imatrix auto or llama-imatrix.") from None
    for name, e in im.entries.items():
        if not np.all(np.isfinite(e.sums)) or np.any(e.sums < 0) or np.any(e.counts < 0):
            raise QuantError(f"{path}: entry {name!r} holds values that are not finite or are negative (squared "
                             "activations cannot be); the file is damaged, recompute it.")
    im.path = path
    return im


def _load_gguf(path: Path) -> Imatrix:
    import gguf

    r = gguf.GGUFReader(path)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in r.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise QuantError(f"{path}: imatrix tensor {t.name} is {t.tensor_type.name}, must be F32.")
        data = np.array(t.data, dtype=np.float32)
        if t.name.endswith(SUM_SUFFIX):
            sums[t.name[: -len(SUM_SUFFIX)]] = data.reshape(-1, int(t.shape[0]))
        elif t.name.endswith(COUNT_SUFFIX):
            counts[t.name[: -len(COUNT_SUFFIX)]] = data.reshape(-1)
    if not sums:
        raise QuantError(f"{path}: no '*.in_sum2' tensors; this is not an imatrix file.")
    unmatched = sorted(set(sums) ^ set(counts))
    if unmatched:
        raise QuantError(f"{path}: sums and counts do not pair up (first: {unmatched[0]!r}); the file is damaged.")
    entries = {n: ImatrixEntry(sums[n], np.rint(counts[n]).astype(np.int64)) for n in sorted(sums)}
    for n, e in entries.items():
        if e.sums.shape[0] != len(e.counts):
            raise QuantError(f"{path}: {n} has {e.sums.shape[0]} matrices but {len(e.counts)} counts.")

    def kv_value(key: str):
        f = r.get_field(key)
        return None if f is None else f.contents()

    datasets = kv_value(KV_DATASETS) or []
    return Imatrix(entries, tuple(datasets if isinstance(datasets, list) else [datasets]),
                   int(kv_value(KV_CHUNK_COUNT) or 0), int(kv_value(KV_CHUNK_SIZE) or 0))


def _load_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise QuantError(f"{path}: truncated imatrix file (neither GGUF nor a complete legacy .dat).")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > 1_000_000:
        raise QuantError(f"{path}: not an imatrix file (bad entry count {n_entries}).")
    entries: dict[str, ImatrixEntry] = {}
    for _ in range(n_entries):
        (n,) = take("<i")
        name = data[pos: pos + n].decode("utf-8", "replace")
        pos += n
        ncall, nval = take("<ii")
        if nval < 1:
            raise QuantError(f"{path}: entry {name!r} has no values.")
        vals = np.array(take(f"<{nval}f"), dtype=np.float32)
        entries[name] = ImatrixEntry(vals.reshape(1, -1), np.array([ncall], dtype=np.int64))
    chunks, datasets = 0, ()
    if len(data) - pos >= 4:
        (chunks,) = take("<i")
        if len(data) - pos >= 4:
            (n,) = take("<i")
            if n > 0:
                datasets = (data[pos: pos + n].decode("utf-8", "replace"),)
    return Imatrix(entries, datasets, chunks, 0, legacy=True)


def save(im: Imatrix, path: str | Path) -> Path:
    """Write llama.cpp's GGUF imatrix format (temp file + rename)."""
    import gguf

    path = Path(path)
    with atomic_output(path) as tmp:
        w = gguf.GGUFWriter(tmp, "imatrix")
        w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes none
        try:
            w.add_string(gguf.Keys.General.TYPE, "imatrix")
            w.add_array(KV_DATASETS, list(im.datasets) or ["unknown"])
            w.add_uint32(KV_CHUNK_COUNT, int(im.chunk_count))
            w.add_uint32(KV_CHUNK_SIZE, int(im.chunk_size))
            for name in sorted(im.entries):
                e = im.entries[name]
                sums = np.ascontiguousarray(e.sums.reshape(len(e.counts), -1), dtype=np.float32)
                w.add_tensor(name + SUM_SUFFIX, sums)
                w.add_tensor(name + COUNT_SUFFIX, np.asarray(e.counts, dtype=np.float32).reshape(-1, 1))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    im.path = path
    return path


def save_legacy(im: Imatrix, path: str | Path) -> Path:
    """Write the legacy .dat format (for old tools); values = mean * ncall, as imatrix.cpp does."""
    path = Path(path)
    out = [struct.pack("<i", len(im.entries))]
    for name in sorted(im.entries):
        e = im.entries[name]
        ncall = max(1, int(max(e.counts)))
        vals = (e.values(im.legacy) * ncall).astype("<f4")
        raw = name.encode()
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, vals.size), vals.tobytes()]
    ds = (im.datasets[0] if im.datasets else "").encode()
    out += [struct.pack("<i", im.chunk_count), struct.pack("<i", len(ds)), ds]
    with atomic_output(path) as tmp:
        tmp.write_bytes(b"".join(out))
    return path


def resolve(imatrix: "Imatrix | str | Path | None") -> Imatrix | None:
    """An Imatrix from an object or a path (None stays None)."""
    if imatrix is None or isinstance(imatrix, Imatrix):
        return imatrix
    return load(imatrix)
