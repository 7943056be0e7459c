"""`ServerOptions`: everything `edge-serve` is started with, validated once.

Defaults are the safe ones: loopback only, no remote or local image fetching,
bounded bodies, images, queue and request time.
"""
from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from pathlib import Path

from edge_llama import kv_type

from edge_runtime.core.open_model import engine_options
from edge_llama.experts import parse_overrides
from edge_runtime.core.options import MiB, EngineOptions
from .watchdog import DEFAULT_STALL_TIMEOUT_S
from edge_runtime.errors import OptionError
from edge_runtime.vision.disk_cache import check_cache_dir

_ORIGIN = re.compile(r"https?://[^/\s]+", re.IGNORECASE)  # fullmatch


def is_origin(text: str) -> bool:
    """Whether --cors-origin accepts `text` as one origin (scheme://host[:port], http or https)."""
    return _ORIGIN.fullmatch(text) is not None


@dataclass(frozen=True)
class ServerOptions:
    """How the server loads its model and what it lets clients do."""

    model_dir: Path  # converter output directory (or a text GGUF with `mmproj`)
    mmproj: Path | None = None
    model_id: str | None = None  # the name /v1/models reports; default: the directory name
    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 2  # slots: requests decoded together in one batch
    # KV cells of the one context, shared by the slots: each gets n_ctx / parallel (llama-server's rule)
    n_ctx: int = 8192
    n_batch: int = 512
    n_ubatch: int | None = None  # None: see EngineOptions
    mmap: bool | str = "auto"
    repack: bool | None = None  # None (and None KV types): edge-bench --tune's values, else on / f16
    kv_cache_type_k: str | None = None
    kv_cache_type_v: str | None = None
    rpc_servers: tuple[str, ...] = ()  # edge-rpc-worker HOST:PORT list (see EngineOptions)
    tensor_split: tuple[float, ...] | None = None
    amx: bool | str = "auto"
    n_cpu_moe: int | str = "auto"  # MoE experts of the first N blocks in host RAM (see EngineOptions)
    override_tensor: tuple[str, ...] = ()  # llama.cpp's -ot entries
    flash_attn: bool | str = "auto"
    n_gpu_layers: int | str = "auto"
    threads: int | None = None
    image_min_tokens: int | None = None
    image_max_tokens: int | None = None
    encoder_cache_mb: float = 128
    detail: str = "auto"  # images without image_url.detail
    image_latency_s: float = 8.0
    encoder_cache_dir: Path | None = None  # encoder outputs on disk (the CLI: the user cache dir)
    cost_cache_dir: Path | str | None = "auto"  # the device's measured image costs ("auto": the user cache dir)
    api_key: str | None = None
    # Saving/restoring conversations (their KV cache) on the server's disk needs this key
    # when set; with only api_key those routes are refused; with neither they are open.
    admin_key: str | None = None
    conversation_dir: Path | None = None  # where saved conversations live (None: the routes are off)
    allow_remote_images: bool = False
    allow_local_dir: Path | None = None
    max_body_bytes: int = 16 * MiB
    max_image_bytes: int = 10 * MiB
    timeout_s: float = 600.0  # per request, from arrival to the last token
    queue_size: int = 16  # requests waiting for a free slot before 429
    remote_fetch_timeout_s: float = 10.0
    default_max_tokens: int = 512
    # Reasoning tokens of a Thinking model when a request sets none (-1: no limit), llama-server's --reasoning-budget.
    reasoning_budget: int = -1
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides loopback ones ("*": any)
    cors_origins: tuple[str, ...] = ()  # origins whose pages may call the API ("*": any)
    prefill_chunk: int | None = None  # prompt tokens evaluated between two decode steps (None: n_ubatch)
    engine_process: bool = True  # run llama.cpp in a child process that is restarted if it dies
    # seconds of silence from a ready engine process before it is killed and restarted (0: never)
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S

    def __post_init__(self) -> None:
        for kv in (self.kv_cache_type_k, self.kv_cache_type_v):
            if kv is not None:
                kv_type(kv)
        object.__setattr__(self, "override_tensor", tuple(str(o) for o in parse_overrides(self.override_tensor)))
        positive = {
            "port": self.port, "parallel": self.parallel, "n_ctx": self.n_ctx, "n_batch": self.n_batch,
            "max_body_bytes": self.max_body_bytes, "max_image_bytes": self.max_image_bytes,
            "queue_size": self.queue_size, "default_max_tokens": self.default_max_tokens,
        }
        for name, value in positive.items():
            if value < 1:
                raise OptionError(f"{name} must be positive, got {value}")
        if self.reasoning_budget < -1:
            raise OptionError(f"reasoning_budget must be -1 (no limit) or a number of tokens >= 0, got "
                             f"{self.reasoning_budget}")
        if not 0 < self.port < 65536:
            raise OptionError(f"port must be in 1..65535, got {self.port}")
        for name in ("timeout_s", "remote_fetch_timeout_s", "encoder_cache_mb", "stall_timeout_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise OptionError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.timeout_s <= 0 or self.remote_fetch_timeout_s <= 0:
            raise OptionError("timeouts must be positive")
        if self.n_ctx // self.parallel < 64:
            raise OptionError(f"n_ctx={self.n_ctx} leaves {self.n_ctx // self.parallel} tokens to each of the "
                             f"{self.parallel} slots; give at least 64 per slot (n_ctx >= {64 * self.parallel})")
        if self.api_key is not None and not self.api_key.strip():
            raise OptionError("api_key is empty; leave it unset to disable authentication")
        if self.admin_key is not None and not self.admin_key.strip():
            raise OptionError("admin_key is empty; leave it unset to keep conversation routes as --api-key says")
        if self.admin_key is not None and self.admin_key == self.api_key:
            raise OptionError("admin_key must differ from api_key: every API user would be an admin")
        if self.conversation_dir is not None and not Path(self.conversation_dir).is_dir():
            raise OptionError(f"--conversation-dir {self.conversation_dir} is not a directory; create it first")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise OptionError(f"prefill_chunk must be positive, got {self.prefill_chunk}")
        for origin in self.cors_origins:
            if origin != "*" and not is_origin(origin):
                raise OptionError(f"--cors-origin {origin!r} is not an origin; use scheme://host[:port], "
                                 "e.g. http://localhost:3000")
        if self.encoder_cache_dir is not None:
            check_cache_dir(self.encoder_cache_dir)  # a file in the way: refused before the server starts
        if self.allow_local_dir is not None and not Path(self.allow_local_dir).is_dir():
            raise OptionError(f"--allow-local-dir {self.allow_local_dir} is not a directory")

    @property
    def loopback_only(self) -> bool:
        return is_loopback(self.host)

    def engine_options(self) -> EngineOptions:
        """One context of `n_ctx` cells, `parallel` sequences sharing it (llama.cpp gives each n_ctx / parallel)."""
        return engine_options(
            n_ctx=self.n_ctx,
            n_batch=self.n_batch,
            n_ubatch=self.n_ubatch,
            mmap=self.mmap,
            repack=self.repack,
            kv_cache_type_k=self.kv_cache_type_k,
            kv_cache_type_v=self.kv_cache_type_v,
            rpc_servers=self.rpc_servers,
            tensor_split=self.tensor_split,
            amx=self.amx,
            n_cpu_moe=self.n_cpu_moe,
            override_tensor=self.override_tensor,
            flash_attn=self.flash_attn,
            n_gpu_layers=self.n_gpu_layers,
            threads=self.threads,
            image_min_tokens=self.image_min_tokens,
            image_max_tokens=self.image_max_tokens,
            encoder_cache_mb=self.encoder_cache_mb,
            encoder_cache_dir=self.encoder_cache_dir,
            image_latency_s=self.image_latency_s,
            cost_cache_dir=self.cost_cache_dir,
            n_seq_max=self.parallel,
        )

    def resolved_model_id(self) -> str:
        if self.model_id:
            return self.model_id
        path = Path(self.model_dir)
        return path.name if path.is_dir() else path.stem


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
