"""What fits on these devices: an estimate's memory split over the local machine and RPC workers.

llama.cpp places whole layers (edge_llama.rpc.assign_layers mirrors its rule);
each device holds its layers' weights and KV cache plus a compute buffer. The
local device also keeps the token embeddings, the projector and the vision
compute buffer (the projector never leaves the host).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from edge_llama.experts import EXPERT_TENSORS
from edge_llama.rpc import SplitPlan, assign_layers, plan_split

from . import kv
from .estimate import Estimate
from .memory import TextDims
from .rules import LAYER


@dataclass(frozen=True)
class DeviceFit:
    name: str
    free: int
    layers: int  # blocks (the output layer counts as one, as in llama.cpp)
    weight_bytes: int
    kv_bytes: int
    compute_bytes: int

    @property
    def need(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.compute_bytes

    @property
    def fits(self) -> bool:
        return self.need <= self.free


def split_fit(e: Estimate, devices: Sequence[tuple[str, int]], shares: Sequence[float] | None = None,
              n_ubatch: int = 64, output_on_host: bool = True, n_cpu_moe: int = 0) -> list[DeviceFit]:
    """Per-device memory of running `e` with devices[0] local (CPU) and the rest RPC workers.

    `devices` are (name, free bytes), e.g. from ggml_backend_rpc_get_device_memory;
    `shares` default to the free memory, as llama.cpp splits. `output_on_host`:
    the output layer stays local (the runtime's default, edge_llama.placement).
    `n_cpu_moe`: the MoE experts of blocks 0..n-1 stay local (--n-cpu-moe).
    """
    d = TextDims.of(e.text.tensors)
    plan: SplitPlan = plan_split(d.n_layer, shares or [float(f) for _, f in devices], local_cpu=True)
    owner = assign_layers(d.n_layer, plan, len(devices) - 1)
    out_dev = 0 if output_on_host else owner[d.n_layer]
    weights = [0] * len(devices)
    layers = [0] * len(devices)
    for il in range(d.n_layer + 1):
        layers[owner[il]] += 1
    for t in e.text.tensors:
        if m := LAYER.match(t.name):
            on_host = int(m[1]) < n_cpu_moe and re.search(EXPERT_TENSORS, t.name)
            weights[0 if on_host else owner[int(m[1])]] += t.nbytes
        elif t.name == "token_embd.weight":
            weights[0] += t.nbytes
            tied = not any(x.name == "output.weight" for x in e.text.tensors)
            if tied and out_dev:  # the output layer elsewhere gets its own copy
                weights[out_dev] += t.nbytes
        else:  # output.weight, output_norm.weight: the output layer
            weights[out_dev] += t.nbytes
    kv_per_layer = kv.kv_bytes_for_rows(1, d.k_row, d.v_row, e.n_ctx, e.kv_type)
    u = n_ubatch
    fits = []
    for i, (name, free) in enumerate(devices):
        blocks = sum(1 for il in range(d.n_layer) if owner[il] == i)
        compute = 4 * u * (2 * d.n_ff + d.n_embd) if layers[i] else 0
        if out_dev == i:
            compute += 4 * u * d.n_vocab + 4 * d.n_vocab  # logits
        w = weights[i]
        if i == 0:
            w += e.mmproj.bytes if e.mmproj else 0
            compute += e.vision_compute_bytes
        fits.append(DeviceFit(name, int(free), layers[i], w, blocks * kv_per_layer, compute))
    return fits


def fit_experts(e: Estimate, devices: Sequence[tuple[str, int]], shares: Sequence[float] | None = None,
                n_ubatch: int = 64) -> tuple[int, list[DeviceFit]]:
    """The fewest leading blocks whose experts stay local so that every worker fits (the runtime's
    n_cpu_moe="auto"), and that split; every block's experts when even that does not fit."""
    n_layer = TextDims.of(e.text.tensors).n_layer
    for n in range(n_layer + 1):
        fits = split_fit(e, devices, shares, n_ubatch, n_cpu_moe=n)
        if all(f.fits for f in fits[1:]):
            return n, fits
    return n_layer, fits


def format_split(e: Estimate, fits: list[DeviceFit], n_cpu_moe: int | None = None) -> str:
    experts = {None: "", 0: ", MoE experts beside their layers"}.get(
        n_cpu_moe, f", MoE experts of blocks 0-{(n_cpu_moe or 0) - 1} on the local machine")
    lines = [f"{e.quant} + {e.mmproj_quant}, n_ctx {e.n_ctx}, KV {e.kv_type}{experts}:"]
    for f in fits:
        lines.append(f"  {f.name:<24} {f.layers:3d} layers  weights {f.weight_bytes / 1e6:9,.1f} MB  "
                     f"KV {f.kv_bytes / 1e6:7,.1f} MB  compute {f.compute_bytes / 1e6:7,.1f} MB  "
                     f"need {f.need / 1e6:9,.1f} MB of {f.free / 1e6:9,.1f} MB free  "
                     f"{'fits' if f.fits else 'DOES NOT FIT'}")
    return "\n".join(lines)
