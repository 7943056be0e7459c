"""Where a model's layers go when RPC workers join: the devices and shares for llama_model_params.

The local machine keeps the token embeddings, the first layers (on its CPU, or
its GPU when it has one) and the projector; the workers take the rest, split
by their free memory unless the caller gives shares. llama.cpp does the
placing; this module only fills `devices`, `n_gpu_layers` and `tensor_split`.
"""
from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import llama_cpp

from .ggml_devices import DEVICE_CPU, DEVICE_GPU, DEVICE_IGPU, Device, local_devices, registry
from .rpc import DEFAULT_TIMEOUT_S, Endpoint, SplitPlan, connect, guard_workers, parse_endpoints, plan_split
from .errors import LoadOptionError

log = logging.getLogger("edge_llama")

# The output layer (and a tied model's copy of token_embd it would use) pinned to the
# host CPU: otherwise the last worker sends back the logits, n_vocab floats per token
# (608 KB for Qwen3-VL's 151,936), instead of one hidden state (8 KB for the 2B).
OUTPUT_ON_HOST = rb"^(output|output_norm|token_embd)\.weight$"


def block_count(model_path: Path) -> int:
    """Transformer blocks of a GGUF (`{arch}.block_count`), read without loading weights."""
    import gguf

    from .gguf_check import check_gguf

    check_gguf(model_path)  # gguf-py trusts the lengths too
    reader = gguf.GGUFReader(str(model_path))
    arch_field = reader.fields["general.architecture"]
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
    count = reader.fields[f"{arch}.block_count"]
    return int(count.parts[count.data[0]][0])


@dataclass
class Placement:
    """RPC workers and shares for one load; `apply` writes them into llama_model_params."""

    endpoints: list[Endpoint]
    local: list[Device]  # the local share: its GPUs, or its CPU
    workers: list[Device]
    plan: SplitPlan
    output_on_host: bool = True
    _keep: list[Any] = field(default_factory=list, repr=False)  # ctypes arrays llama.cpp reads

    def buffer_devices(self) -> dict[str, str]:
        """llama.cpp's buffer name of each worker device ("RPC<index on worker>[endpoint]") -> device name."""
        seen: dict[str, int] = {}
        out = {}
        for d in self.workers:
            index = seen.get(d.description, 0)
            seen[d.description] = index + 1
            out[f"RPC{index}[{d.description}]"] = d.name
        return out

    def describe(self, weights: dict[str, tuple[int, int]]) -> str:
        """"CPU 10 layers 412.3 MiB; RPC0 (10.0.0.2:50052) 19 layers 801.0 MiB"."""
        where = {d.name: d.description for d in self.workers}
        return "; ".join(f"{name}{f' ({where[name]})' if name in where else ''} {layers} layers "
                         f"{nbytes / 2**20:.1f} MiB" for name, (layers, nbytes) in weights.items())

    @property
    def local_cpu(self) -> bool:
        return all(d.kind == DEVICE_CPU for d in self.local)

    def host_pins(self) -> list[tuple[bytes, int]]:
        """tensor_buft_overrides entries (pattern, buffer type) that keep tensors on the host CPU."""
        if self.output_on_host and self.local_cpu:
            # overriding to the CPU buffer type keeps llama.cpp's repacked layouts (llama-model-loader.cpp)
            return [(OUTPUT_ON_HOST, int(registry().cpu_buffer_type()))]
        return []

    def apply(self, params: Any) -> None:
        """devices, tensor_split, n_gpu_layers and split_mode (the host pins go in params' override table)."""
        offload = ([] if self.local_cpu else self.local) + self.workers
        devices = (ctypes.c_void_p * (len(offload) + 1))(*[d.handle for d in offload], None)
        split = (ctypes.c_float * llama_cpp.llama_max_devices())(*self.plan.tensor_split)
        self._keep = [devices, split]
        params.devices = ctypes.cast(devices, ctypes.c_void_p)
        params.tensor_split = split
        params.n_gpu_layers = self.plan.n_gpu_layers
        params.split_mode = llama_cpp.LLAMA_SPLIT_MODE_LAYER


def place(
    model_path: Path,
    rpc_servers: Sequence[str],
    tensor_split: Sequence[float] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    output_on_host: bool = True,
) -> Placement:
    """Probe the workers (clear error within `timeout_s`), then plan the split.

    `tensor_split` has one share per local device (its GPUs, or 1 for its CPU)
    followed by one per worker device; None splits by free memory.
    `output_on_host` keeps the output layer on a CPU host (see OUTPUT_ON_HOST).
    """
    endpoints = parse_endpoints(list(rpc_servers))
    devices = local_devices()
    local = [d for d in devices if d.kind in (DEVICE_GPU, DEVICE_IGPU)] or [d for d in devices if d.kind == DEVICE_CPU][:1]
    workers = connect(endpoints, timeout_s)
    if tensor_split is None:
        shares = [float(d.free) for d in local + workers]
    else:
        shares = [float(s) for s in tensor_split]
        if len(shares) != len(local) + len(workers):
            names = [d.name for d in local] + [f"{d.name}[{d.description}]" for d in workers]
            raise LoadOptionError(
                f"tensor_split has {len(shares)} shares but there are {len(names)} devices "
                f"({', '.join(names)}): give one per device, local first"
            )
    plan = plan_split(block_count(model_path), shares, local_cpu=all(d.kind == DEVICE_CPU for d in local))
    guard_workers(endpoints)
    return Placement(endpoints, local, workers, plan, output_on_host)
