"""A cheap look at a GGUF before llama.cpp opens it, so a damaged file is an EdgeError, not a dead process.

llama.cpp trusts a GGUF's lengths: a count or string length that no file could hold makes
gguf.cpp allocate it (an mmproj whose header was hit by random bytes grew past 1.6 GB before the
kernel killed the process), and duplicate tokens after a corrupted token array trip a GGML_ASSERT
in llama_vocab's load, which aborts. Both are facts about the file that a reader bounded by the
file's size can see first: this module walks the header, every key/value and every tensor
record (reading only those bytes through mmap, so a multi-GB model costs milliseconds to tens of
milliseconds) and refuses the file naming the key and the fix. Weights are not read: a flipped
weight is a wrong answer, not a crash.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path

from gguf import GGML_QUANT_SIZES

from edge_common.errors import EdgeError

from .errors import DamagedGGUFError

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_MAX_DIMS = 4  # GGML_MAX_DIMS
# gguf value types -> (struct format, size); 8 is a string, 9 an array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY, _INT32, _FLOAT32 = 8, 9, 5, 6
_TOKEN_TYPES = range(0, 7)  # llama_token_type: UNDEFINED .. BYTE
_MIN_KV = 8 + 4 + 1  # an empty key, its type, one byte of value
_MIN_TENSOR = 8 + 4 + 4 + 8  # an empty name, n_dims, type, offset


class _Damaged(EdgeError):
    """Internal: where the walk stopped and why; turned into DamagedGGUFError with the file's name."""

    def __init__(self, key: str, why: str):
        super().__init__(why)
        self.key, self.why = key, why


class _Reader:
    """Reads little-endian values from a buffer, every length bounded by what is left of it."""

    def __init__(self, buf, key: str = "header"):
        self.buf, self.pos, self.size, self.key = buf, 0, len(buf), key

    def take(self, n: int) -> memoryview:
        if n < 0 or n > self.size - self.pos:
            raise _Damaged(self.key, f"needs {n} bytes at offset {self.pos} but the file has {self.size - self.pos} left")
        start, self.pos = self.pos, self.pos + n
        return self.buf[start:self.pos]

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> bytes:
        return bytes(self.take(self.scalar("<Q")))

    def skip_strings(self, n: int, keep: bool) -> list[bytes] | None:
        if n * 8 > self.size - self.pos:
            raise _Damaged(self.key, f"holds {n} strings, more than the {self.size - self.pos} bytes left")
        out: list[bytes] | None = [] if keep else None
        for _ in range(n):
            s = self.string()
            if out is not None:
                out.append(s)
        return out


# tokenizer keys whose arrays llama.cpp indexes by token id (llama-vocab.cpp)
_TOKENS, _TYPES, _SCORES = "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"


def _value(r: _Reader, vtype: int, keep: bool):
    """One value of type `vtype`; arrays of numbers come back as (element type, count, bytes), strings
    of an array only when `keep` (the token list)."""
    if vtype in _SCALARS:
        return r.scalar(_SCALARS[vtype])
    if vtype == _STRING:
        return r.string()
    if vtype != _ARRAY:
        raise _Damaged(r.key, f"has value type {vtype}, which no GGUF uses")
    etype, n = r.scalar("<I"), r.scalar("<Q")
    if etype == _STRING:
        return etype, n, r.skip_strings(n, keep)
    if etype == _ARRAY:  # nested arrays: no tool writes them and llama.cpp reads none
        raise _Damaged(r.key, "is an array of arrays")
    if etype not in _SCALARS:
        raise _Damaged(r.key, f"is an array of type {etype}, which no GGUF uses")
    return etype, n, bytes(r.take(n * struct.calcsize(_SCALARS[etype])))


def _check_vocab(kv: dict) -> None:
    if _TOKENS not in kv:
        return
    etype, n_tokens, tokens = kv[_TOKENS]
    if etype != _STRING:
        raise _Damaged(_TOKENS, "is not an array of strings")
    seen: set[bytes] = set()
    for i, t in enumerate(tokens):
        t = t or b"[EMPTY_%d]" % i  # llama.cpp's stand-in for an empty token
        if t in seen:
            raise _Damaged(_TOKENS, f"holds token {i} ({t[:40]!r}) twice; llama.cpp aborts on a repeated token")
        seen.add(t)
    for key, want in ((_TYPES, _INT32), (_SCORES, _FLOAT32)):
        if key not in kv:
            continue
        got = kv[key]
        if not isinstance(got, tuple) or got[0] != want or got[1] != n_tokens:
            count = got[1] if isinstance(got, tuple) else "not an array"
            raise _Damaged(key, f"must be {n_tokens} values (one per token) of gguf type {want}; "
                                f"it is {count} values of type {got[0] if isinstance(got, tuple) else '-'}")
    if _TYPES in kv:
        types = memoryview(kv[_TYPES][2]).cast("i")
        bad = next((i for i, v in enumerate(types) if v not in _TOKEN_TYPES), None)
        if bad is not None:
            raise _Damaged(_TYPES, f"gives token {bad} type {types[bad]}, outside 0..6")
    arch = kv.get("general.architecture")
    size = kv.get(f"{arch.decode(errors='replace')}.vocab_size") if isinstance(arch, bytes) else None
    if isinstance(size, int) and size != n_tokens:
        raise _Damaged(f"{arch.decode(errors='replace')}.vocab_size", f"says {size} but the token list holds {n_tokens}")


def _walk(buf) -> None:
    r = _Reader(buf)
    if bytes(r.take(4)) != _MAGIC:
        raise _Damaged("header", "does not start with the GGUF magic")
    version = r.scalar("<I")
    if version not in _VERSIONS:
        raise _Damaged("header", f"has version {version}; llama.cpp reads versions 2 and 3")
    n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
    if n_kv * _MIN_KV > r.size:
        raise _Damaged("header", f"announces {n_kv} keys, more than the file's {r.size} bytes can hold")
    if n_tensors * _MIN_TENSOR > r.size:
        raise _Damaged("header", f"announces {n_tensors} tensors, more than the file's {r.size} bytes can hold")
    kv: dict = {}
    for i in range(n_kv):
        r.key = f"key #{i}"
        name = r.string().decode("utf-8", "replace")
        r.key = name
        vtype = r.scalar("<I")
        kv[name] = _value(r, vtype, keep=name == _TOKENS)
    _check_vocab(kv)
    tensors = []
    for i in range(n_tensors):
        r.key = f"tensor #{i}"
        name = r.string().decode("utf-8", "replace")
        r.key = f"tensor {name}"
        n_dims = r.scalar("<I")
        if n_dims > _MAX_DIMS:
            raise _Damaged(r.key, f"has {n_dims} dimensions; ggml allows {_MAX_DIMS}")
        dims = [r.scalar("<Q") for _ in range(n_dims)]
        ttype, offset = r.scalar("<I"), r.scalar("<Q")
        if ttype not in GGML_QUANT_SIZES:
            raise _Damaged(r.key, f"has ggml type {ttype}, which this llama.cpp does not know")
        block, type_size = GGML_QUANT_SIZES[ttype]
        n = 1
        for d in dims:
            n *= d
        if not dims or n % block or (dims[0] % block):
            raise _Damaged(r.key, f"has shape {dims}, not whole blocks of {block}")
        tensors.append((r.key, offset, n // block * type_size))
    align = kv.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise _Damaged("general.alignment", f"is {align!r}, not a power of two")
    data_start = -(-r.pos // align) * align
    for key, offset, nbytes in tensors:
        if offset % align or data_start + offset + nbytes > r.size:
            raise _Damaged(key, f"lies at bytes {offset}..{offset + nbytes} of the data, past the file's end "
                                f"({r.size - data_start} data bytes)")


_PASSED: set[tuple] = set()  # (path, inode, size, mtime) of files that passed: every reader checks, once


def check_gguf(path: str | Path, what: str = "model") -> None:
    """Refuses (DamagedGGUFError naming the file and key) a GGUF whose structure llama.cpp cannot
    survive reading; a file that passes may still be refused by llama.cpp with its own error."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return  # the caller's own open names the missing file
    stamp = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if stamp in _PASSED:
        return
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                _walk(view)
            finally:
                view.release()
    except _Damaged as e:
        raise DamagedGGUFError(f"the {what} {path} is damaged: {e.key} {e.why}; download it again or "
                               f"re-convert it (edge-convert)", key=e.key) from None
    except ValueError as e:  # mmap of an empty file
        raise DamagedGGUFError(f"the {what} {path} is damaged: {e}; download it again or re-convert it "
                               f"(edge-convert)", key="header") from None
    _PASSED.add(stamp)
