"""Where a mixture-of-experts model's expert tensors live: llama.cpp's tensor buffer overrides.

A MoE token reads only its top-k experts, so the expert matrices (most of the
bytes: 30.8 of the 32.5 GB of 30B-A3B at q8_0) can stay in host RAM while the
attention and shared weights fill a GPU or the RPC workers. llama.cpp does the
placing through `llama_model_params.tensor_buft_overrides` (pattern -> buffer
type, the first pattern that matches a tensor name wins); this module spells
those patterns as llama.cpp's own tools do and decides how many layers' experts
stay on the host when the user did not say.

Mirrors llama.cpp b11312 common/common.h (LLM_FFN_EXPS_REGEX, llm_add_n_cpu_ffn_overrides)
and common/arg.cpp (-ot/--override-tensor, --cpu-moe, --n-cpu-moe).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import LoadOptionError

# common.h LLM_FFN_EXPS_REGEX: the merged expert matrices of a block (searched, not matched)
EXPERT_TENSORS = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
# The buffer type name of the host's plain memory; llama.cpp still picks its repacked
# layouts for a tensor overridden to it (llama-model-loader.cpp, "check overrides").
HOST = "CPU"


@dataclass(frozen=True)
class TensorOverride:
    """One -ot entry: tensors whose name `pattern` finds (std::regex_search) go to buffer type `buffer`."""

    pattern: str
    buffer: str  # a buffer type name as llama.cpp prints them: "CPU", "CUDA0", "RPC0[host:port]"

    def __post_init__(self) -> None:
        if not self.pattern or not self.buffer:
            raise LoadOptionError(f"tensor override {self.pattern!r}={self.buffer!r}: use PATTERN=BUFFER_TYPE, "
                                  "e.g. exps=CPU")
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise LoadOptionError(f"tensor override pattern {self.pattern!r} is not a regular expression: {exc}") \
                from None

    def __str__(self) -> str:
        return f"{self.pattern}={self.buffer}"


def parse_overrides(items: str | Sequence[str]) -> tuple[TensorOverride, ...]:
    """-ot values as llama.cpp takes them ("PATTERN=BUFT,PATTERN=BUFT", the flag repeatable)."""
    parts = [items] if isinstance(items, str) else list(items)
    out = []
    for part in parts:
        for entry in str(part).split(","):
            if not entry.strip():
                continue
            pattern, sep, buffer = entry.strip().partition("=")
            if not sep:
                raise LoadOptionError(f"tensor override {entry!r} has no '=': use PATTERN=BUFFER_TYPE, e.g. exps=CPU")
            out.append(TensorOverride(pattern, buffer))
    return tuple(out)


def experts_on_host(n_layers: int) -> tuple[TensorOverride, ...]:
    """--n-cpu-moe N: the experts of blocks 0..N-1 in host RAM (one pattern per block, as llama.cpp builds them)."""
    return tuple(TensorOverride(rf"blk\.{i}{EXPERT_TENSORS}", HOST) for i in range(n_layers))


ALL_EXPERTS_ON_HOST = TensorOverride(EXPERT_TENSORS, HOST)  # --cpu-moe


# ---------------------------------------------------------------- sizes and the automatic choice

_BLOCK = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class LayerBytes:
    """Weight bytes of a GGUF per block: its experts and the rest (attention, norms, router)."""

    experts: tuple[int, ...]
    rest: tuple[int, ...]
    outside: int  # token embeddings, output norm and output layer
    kv_widths: tuple[int, int] = (0, 0)  # K and V values per token and block (n_head_kv * head size)

    @property
    def n_layer(self) -> int:
        return len(self.rest)

    @property
    def has_experts(self) -> bool:
        return any(self.experts)


def layer_bytes(path: str | Path) -> LayerBytes:
    """Read from the GGUF's tensor table (no weights are loaded)."""
    from gguf import GGUFReader

    from .gguf_check import check_gguf

    check_gguf(path)  # gguf-py trusts the lengths too
    reader = GGUFReader(str(path))
    tensors = reader.tensors

    def number(key: str, default: int = 0) -> int:
        field = reader.fields.get(key)
        return int(field.parts[field.data[0]][0]) if field is not None and field.data else default

    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field is not None else ""
    n_head, n_head_kv = number(f"{arch}.attention.head_count", 1), number(f"{arch}.attention.head_count_kv")
    head_k = number(f"{arch}.attention.key_length", number(f"{arch}.embedding_length") // max(n_head, 1))
    head_v = number(f"{arch}.attention.value_length", head_k)
    n_layer = 1 + max((int(m.group(1)) for t in tensors if (m := _BLOCK.match(t.name))), default=-1)
    experts, rest, outside = [0] * n_layer, [0] * n_layer, 0
    for t in tensors:
        m = _BLOCK.match(t.name)
        if m is None:
            outside += int(t.n_bytes)
        elif re.search(EXPERT_TENSORS, t.name):
            experts[int(m.group(1))] += int(t.n_bytes)
        else:
            rest[int(m.group(1))] += int(t.n_bytes)
    return LayerBytes(tuple(experts), tuple(rest), outside, (n_head_kv * head_k, n_head_kv * head_v))


def fit_n_cpu_moe(sizes: LayerBytes, owners: Sequence[int], free: Sequence[int], reserve: Sequence[int]) -> int | None:
    """The fewest leading blocks whose experts must stay on the host so every offload device fits.

    `owners[i]` is the device of block i (0: the host, d >= 1: the d-th offload device, as
    rpc.assign_layers returns them), `free[d-1]` its free bytes and `reserve[d-1]` what it
    also needs beside the weights (KV cache, compute buffers). None: not even with every
    expert on the host does the rest fit (llama.cpp would then fail to allocate).
    """
    for n in range(sizes.n_layer + 1):
        need = [0] * len(free)
        for i, owner in enumerate(owners[:sizes.n_layer]):
            if owner:
                need[owner - 1] += sizes.rest[i] + (sizes.experts[i] if i >= n else 0)
        if all(need[d] + reserve[d] <= free[d] for d in range(len(free))):
            return n
    return None
