"""Typed options: how an engine is built, and how one answer is generated."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Sequence

from edge_llama import LoadOptions, kv_type
from edge_llama.experts import parse_overrides
from edge_llama.rpc import parse_endpoint
from edge_runtime.errors import OptionError
from edge_runtime.vision.disk_cache import check_cache_dir


# Tokens of one image at most: x 32 x 32 pixels still fits the int32 sizes mtmd computes with.
MAX_IMAGE_TOKENS = 1 << 20

MiB = 1 << 20


@dataclass(frozen=True)
class EngineOptions:
    """Settings fixed when the model is loaded (changing them means reloading)."""

    n_ctx: int = 4096
    n_batch: int = 512
    # Tokens per forward pass inside a batch; sizes the compute buffer.
    # None: n_batch on a GPU, at most 64 on the CPU (see backend.resolve_ubatch).
    n_ubatch: int | None = None
    # None / "auto" on the tunable settings (KV types, flash attention, threads, n_ubatch, repack):
    # the value edge-bench --tune measured best on this device for this model pair (core/tuned.py),
    # else the built-in default (f16 KV, llama.cpp's auto, physical cores, see below, repack on).
    kv_cache_type_k: str | None = None
    kv_cache_type_v: str | None = None
    flash_attn: bool | str = "auto"
    mmproj_flash_attn: bool | str = "auto"  # "auto": on for a CPU projector, else flash_attn's
    n_gpu_layers: int | str = "auto"
    threads: int | None = None  # None: physical cores
    image_min_tokens: int | None = None  # None: the projector's default
    image_max_tokens: int | None = None
    # Encoder outputs of recent images (MiB, like every size a person sets), so a new conversation
    # about the same picture skips the vision encoder. A 2B model's 640x480 image is ~10 MiB.
    encoder_cache_mb: float = 128
    # Encoder outputs on disk for new processes (None: off), bounded in MiB.
    encoder_cache_dir: str | None = None
    encoder_cache_disk_mb: float = 1024
    # detail="auto": the largest image budget whose predicted encode + prefill fits this.
    image_latency_s: float = 8.0
    # Where the measured encoder/prefill rates of this device are kept: "auto" the user cache dir
    # ($XDG_CACHE_HOME/qwen3-vl-edge), None in memory only (then each process calibrates at load).
    cost_cache_dir: str | None = "auto"
    n_seq_max: int = 1  # parallel sequences (a server would raise it)
    mmproj_gpu: bool | None = None  # None: follow n_gpu_layers
    # "auto": map the file unless CPU layers are repacked (then read it once:
    # the mapped pages would stay resident beside the repacked copy).
    mmap: bool | str = "auto"
    repack: bool | None = None  # llama.cpp's interleaved CPU weight layouts (None: tuned, else on)
    # llama.cpp RPC workers ("host:port", edge-rpc-worker) that take a share of the layers.
    rpc_servers: tuple[str, ...] = ()
    # Shares: one per local device (its GPUs, or its CPU) then one per worker
    # device; None splits by free memory. Only with rpc_servers.
    tensor_split: tuple[float, ...] | None = None
    rpc_timeout_s: float = 5.0  # connecting and handshaking with each worker
    # Keep the output layer on this machine (a CPU host): each token then sends one hidden
    # state back, not n_vocab logits (8 KB vs 608 KB for the 2B). False: a faster worker computes it.
    rpc_output_on_host: bool = True
    # One evaluation (llama_decode) longer than this with workers means a worker
    # stopped answering: the process ends naming it (see edge_llama.rpc).
    rpc_stall_s: float = 300.0
    # Intel AMX among them: "auto" uses it only where a cached child-process probe showed that
    # llama.cpp's AMX kernels work on this CPU ($EDGE_AMX=auto|on|off decides "auto"); False keeps
    # repacking without AMX; True forces it (llama.cpp's own default).
    amx: bool | str = "auto"
    # MoE experts of the first N blocks in host RAM (llama.cpp's --n-cpu-moe), the rest beside
    # their layers on the GPU / RPC workers: "auto" keeps the fewest that let the offloaded part
    # fit the devices' free memory (nothing to do on a CPU-only load), "all" is --cpu-moe.
    n_cpu_moe: int | str = "auto"
    # llama.cpp's -ot: "PATTERN=BUFFER_TYPE" entries (e.g. "exps=CPU"), applied before n_cpu_moe.
    override_tensor: tuple[str, ...] = ()
    # Where edge-bench --tune's settings are read from: "auto" the user cache dir, None ignore them.
    tuned_dir: str | None = "auto"
    # Whose tuned settings: "image" (first-image TTFT), "chat" (decode); "auto": image with a projector.
    workload: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.rpc_servers, str):
            object.__setattr__(self, "rpc_servers", tuple(s for s in self.rpc_servers.split(",") if s.strip()))
        object.__setattr__(self, "rpc_servers", tuple(str(parse_endpoint(s)) for s in self.rpc_servers))
        if self.tensor_split is not None:
            object.__setattr__(self, "tensor_split", tuple(float(x) for x in self.tensor_split))
            if not self.rpc_servers:
                raise OptionError("tensor_split places layers on RPC workers: give rpc_servers too")
        if self.rpc_servers and self.n_gpu_layers != "auto":
            raise OptionError("with rpc_servers, layers are placed by tensor_split: leave n_gpu_layers='auto'")
        if self.rpc_timeout_s <= 0 or self.rpc_stall_s <= 0:
            raise OptionError("rpc_timeout_s and rpc_stall_s must be positive")
        for kv in (self.kv_cache_type_k, self.kv_cache_type_v):
            if kv is not None:
                kv_type(kv)
        if not (self.mmproj_flash_attn == "auto" or isinstance(self.mmproj_flash_attn, bool)):
            raise OptionError(f"mmproj_flash_attn must be 'auto', True or False, got {self.mmproj_flash_attn!r}")
        if self.workload not in ("auto", "image", "chat"):
            raise OptionError(f"workload must be 'auto', 'image' or 'chat', got {self.workload!r}")
        if isinstance(self.override_tensor, str):
            object.__setattr__(self, "override_tensor", (self.override_tensor,))
        object.__setattr__(self, "override_tensor",
                           tuple(str(o) for o in parse_overrides(tuple(self.override_tensor))))
        moe = self.n_cpu_moe
        if not (moe in ("auto", "all") or (isinstance(moe, int) and not isinstance(moe, bool) and moe >= 0)):
            raise OptionError(f"n_cpu_moe must be 'auto', 'all' or a number of blocks >= 0, got {moe!r}")
        if self.n_ctx < 16:
            raise OptionError(f"n_ctx must be at least 16, got {self.n_ctx}")
        if self.n_batch < 1:
            raise OptionError(f"n_batch must be positive, got {self.n_batch}")
        if self.n_ubatch is not None and self.n_ubatch < 1:
            raise OptionError(f"n_ubatch must be positive, got {self.n_ubatch}")
        if not (self.mmap == "auto" or isinstance(self.mmap, bool)):
            raise OptionError(f"mmap must be 'auto', True or False, got {self.mmap!r}")
        LoadOptions(mmap=self.mmap, repack=self.repack is not False, amx=self.amx)  # refuses bad mmap / amx values
        if self.threads is not None and self.threads < 1:
            raise OptionError(f"threads must be positive, got {self.threads}")
        if self.n_seq_max < 1:
            raise OptionError(f"n_seq_max must be positive, got {self.n_seq_max}")
        for name in ("encoder_cache_mb", "encoder_cache_disk_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise OptionError(f"{name} must be a finite number of MiB >= 0, got {value!r}")
        if self.encoder_cache_dir is not None:
            check_cache_dir(self.encoder_cache_dir)  # a file in the way: refused before the model loads
        latency = self.image_latency_s
        if isinstance(latency, bool) or not isinstance(latency, (int, float)) or not math.isfinite(latency) \
                or latency <= 0:
            raise OptionError(f"image_latency_s must be a positive number of seconds, got {latency!r}")
        for name in ("image_min_tokens", "image_max_tokens"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"{name} must be a whole number >= 1, got {value!r}")
            if value > MAX_IMAGE_TOKENS:
                raise OptionError(f"{name} must be at most {MAX_IMAGE_TOKENS} (its pixels must fit llama.cpp's "
                                  f"32-bit sizes), got {value}")
        if (
            self.image_min_tokens is not None
            and self.image_max_tokens is not None
            and self.image_min_tokens > self.image_max_tokens
        ):
            raise OptionError(
                f"image_min_tokens ({self.image_min_tokens}) > image_max_tokens ({self.image_max_tokens})"
            )


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling and stopping for one answer.

    Defaults follow Qwen3-VL Instruct's generation_config; temperature 0 is greedy.
    """

    max_tokens: int | None = 512  # None: until n_ctx is full
    temperature: float = 0.7
    top_k: int = 20
    top_p: float = 0.8
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None: the chat's seed
    stop: tuple[str, ...] = ()
    grammar: str | None = None  # GBNF
    json_schema: Mapping[str, Any] | str | None = None
    keep_think: bool = False  # show the reasoning of Thinking models inline, tags and all
    # Reasoning tokens after which the answer is forced to start (the close tag is inserted);
    # None: no limit. They count toward max_tokens, as llama-server's --reasoning-budget does.
    max_thinking_tokens: int | None = None
    top_logprobs: int | None = None  # None: no logprobs; N (0-20): each token's logprob and the N likeliest

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise OptionError(f"max_tokens must be positive, got {self.max_tokens}")
        for name in ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise OptionError(f"{name} must be a finite number, got {value!r}")
        if self.temperature < 0:
            raise OptionError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise OptionError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise OptionError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repeat_penalty <= 0:
            raise OptionError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if self.top_logprobs is not None and not (isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= 20):
            raise OptionError(f"top_logprobs must be an integer in [0, 20] (or None: no logprobs), "
                             f"got {self.top_logprobs!r}")
        budget = self.max_thinking_tokens
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise OptionError(f"max_thinking_tokens must be a whole number >= 0 (0: answer at once) or None, "
                              f"got {budget!r}")
        if self.grammar is not None and self.json_schema is not None:
            raise OptionError("give either grammar or json_schema, not both")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(s for s in self.stop if s))

    @property
    def greedy(self) -> bool:
        """Temperature 0 means argmax: no sampler randomness, so answers repeat exactly."""
        return self.temperature <= 0.0

    def updated(self, overrides: Mapping[str, Any]) -> "GenerationOptions":
        """A copy with keyword overrides, rejecting unknown names early."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            # a plain TypeError: an unknown keyword is a caller's type error, as Python raises it
            raise TypeError(f"unknown generation option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = dict(overrides)
        if isinstance(values.get("stop"), Sequence) and not isinstance(values.get("stop"), str):
            values["stop"] = tuple(values["stop"])
        return replace(self, **values)
