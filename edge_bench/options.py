"""Typed options of a benchmark run and of one measured configuration.

`BenchOptions` is what the command line chose; `Config` is one point of the
matrix (quant x KV-cache type x image resolution). Both are plain data so a
worker subprocess receives them as JSON and rebuilds them exactly.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator, Mapping
from edge_runtime.errors import OptionError

# Baselines measured beside the runtime ("visionchat"). The transformers one needs
# the `convert` extra and several GB of RAM, so it is off unless asked for.
RUNTIME = "visionchat"
RAW = "raw"
CHAT_HANDLER = "chat_handler"
TRANSFORMERS = "transformers"
MEMORY = "memory"  # the peak-RSS breakdown, not a party of the comparison
ACCURACY = "accuracy"  # divergence from the float files, not a party either
BASELINES = (RAW, CHAT_HANDLER, TRANSFORMERS)
DEFAULT_BASELINES = (RAW, CHAT_HANDLER)

# --extra-bufts modes: how weights use llama.cpp's CPU extra buffer types -> (repack, amx).
# auto: the runtime's default (AMX only where its probe passed); amx: llama.cpp's own default;
# repack: CPU repacking without AMX; none: plain CPU buffers. repack None = follow --repack/--no-repack.
EXTRA_BUFTS = {"auto": (None, "auto"), "amx": (True, "on"), "repack": (True, "off"), "none": (False, "off")}


@dataclass(frozen=True, order=True)
class Resolution:
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.width < 32 or self.height < 32:
            raise OptionError(f"image resolution {self} is too small: both sides must be >= 32 pixels")

    @classmethod
    def parse(cls, text: str) -> "Resolution":
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
        if not m:
            raise OptionError(f"image resolution {text!r} is not WIDTHxHEIGHT (e.g. 640x480)")
        return cls(int(m[1]), int(m[2]))

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class Measure:
    """How each configuration is exercised (identical for the runtime and every baseline)."""

    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int | None = None  # None: what VisionChat picks on this device
    mmap: bool | str = "auto"  # as VisionChat: read, not map, when CPU weights are repacked
    repack: bool = True
    rpc_servers: tuple[str, ...] = ()  # edge-rpc-worker HOST:PORT list: VisionChat splits layers over them
    tensor_split: tuple[float, ...] | None = None
    n_cpu_moe: int | str = "auto"  # MoE experts of the first N blocks in host RAM (EngineOptions.n_cpu_moe)
    override_tensor: tuple[str, ...] = ()  # llama.cpp's -ot entries
    threads: int = 1
    flash_attn: bool = True  # same for all: a quantized V cache needs it anyway
    n_gpu_layers: int = 0  # 0: CPU only; -1: every layer (and the projector) on the GPU
    image_max_tokens: int | None = None  # None: the projector's default budget
    prompt_lengths: tuple[int, ...] = (128, 512)
    decode_tokens: int = 32
    warmup: int = 1
    repeats: int = 3

    def __post_init__(self) -> None:
        if self.n_ctx < 256:
            raise OptionError(f"n_ctx must be at least 256, got {self.n_ctx}")
        if self.threads < 1:
            raise OptionError(f"threads must be positive, got {self.threads}")
        if self.decode_tokens < 3:
            raise OptionError("decode_tokens must be >= 3: the decode rate is the median gap after the first token")
        if self.repeats < 1 or self.warmup < 0:
            raise OptionError(f"need repeats >= 1 and warmup >= 0, got {self.repeats} and {self.warmup}")
        if not self.prompt_lengths or min(self.prompt_lengths) < 1:
            raise OptionError(f"prompt lengths must be positive, got {self.prompt_lengths}")
        if max(self.prompt_lengths) + self.decode_tokens + 64 > self.n_ctx:
            raise OptionError(f"prompt length {max(self.prompt_lengths)} + {self.decode_tokens} generated tokens "
                             f"does not fit n_ctx={self.n_ctx}")
        if self.image_max_tokens is not None and self.image_max_tokens < 1:
            raise OptionError(f"image_max_tokens must be positive, got {self.image_max_tokens}")

    def load_settings(self, config: "Config | None" = None) -> tuple[bool, int]:
        """(mmap, n_ubatch) resolved as VisionChat resolves them, so every party loads the same way."""
        from edge_llama import resolve_mmap, resolve_ubatch

        repack = self.repack if config is None else config.repack(self)
        return (resolve_mmap(self.mmap, self.n_gpu_layers, repack),
                resolve_ubatch(self.n_ubatch, self.n_batch, self.n_gpu_layers))


@dataclass(frozen=True, order=True)
class Config:
    """One point of the matrix. `quant` names the text model's type."""

    quant: str
    mmproj_quant: str
    kv_type: str
    resolution: Resolution
    bufts: str = "auto"  # a key of EXTRA_BUFTS

    def __post_init__(self) -> None:
        if self.bufts not in EXTRA_BUFTS:
            raise OptionError(f"unknown extra-buffer-type mode {self.bufts!r}; choose from {', '.join(EXTRA_BUFTS)}")

    @property
    def label(self) -> str:
        bufts = "" if self.bufts == "auto" else f" bufts {self.bufts}"
        return f"{self.quant}+{self.mmproj_quant} KV {self.kv_type} {self.resolution}{bufts}"

    @property
    def amx(self) -> str:
        return EXTRA_BUFTS[self.bufts][1]

    def repack(self, measure: Measure) -> bool:
        forced = EXTRA_BUFTS[self.bufts][0]
        return measure.repack if forced is None else forced

    def to_dict(self) -> dict[str, Any]:
        return {"quant": self.quant, "mmproj_quant": self.mmproj_quant, "kv_type": self.kv_type,
                "resolution": str(self.resolution), "bufts": self.bufts}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Config":
        return cls(data["quant"], data["mmproj_quant"], data["kv_type"], Resolution.parse(data["resolution"]),
                   data.get("bufts", "auto"))


# The memory target: this configuration at n_ctx 4096 within 2.0 GB peak RSS.
RSS_TARGET_CONFIG = Config("q4_k_m", "q8_0", "q8_0", Resolution(640, 480))
RSS_TARGET_N_CTX = 4096
RSS_TARGET_BYTES = 2.0e9


@dataclass(frozen=True)
class BenchOptions:
    quants: tuple[str, ...] = ("q4_k_m",)
    mmproj_quant: str = "q8_0"
    kv_types: tuple[str, ...] = ("q8_0",)
    resolutions: tuple[Resolution, ...] = (Resolution(640, 480),)
    extra_bufts: tuple[str, ...] = ("auto",)
    measure: Measure = field(default_factory=Measure)
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    # Each pass runs the runtime and its baselines once more, alternating, and the samples
    # are pooled: on a shared machine a load change then hits both sides of a ratio.
    passes: int = 1
    worker_timeout_s: float = 3600.0
    bandwidth: bool = True
    memory_breakdown: bool = False  # RSS per loading step, for load settings that could lower the peak
    accuracy: bool = False  # KL / top-1 / image cosine of each configuration against the float files

    def __post_init__(self) -> None:
        for name in ("quants", "kv_types", "resolutions", "extra_bufts"):
            if not getattr(self, name):
                raise OptionError(f"{name} must not be empty")
        if self.passes < 1:
            raise OptionError(f"passes must be >= 1, got {self.passes}")
        bad = sorted(set(self.extra_bufts) - set(EXTRA_BUFTS))
        if bad:
            raise OptionError(f"unknown --extra-bufts mode(s) {', '.join(bad)}; choose from {', '.join(EXTRA_BUFTS)}")
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown:
            raise OptionError(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(BASELINES)}")

    def configs(self) -> Iterator[Config]:
        """The matrix in a stable order: quant, then KV type, then resolution, then extra-buffer-type mode."""
        for q in self.quants:
            for kv in self.kv_types:
                for res in self.resolutions:
                    for bufts in self.extra_bufts:
                        yield Config(q, self.mmproj_quant, kv, res, bufts)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "measure"}
        data["resolutions"] = [str(r) for r in self.resolutions]
        data["measure"] = asdict(self.measure)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BenchOptions":
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        for name in ("quants", "kv_types", "baselines", "extra_bufts"):
            if name in values:
                values[name] = tuple(values[name])
        values["resolutions"] = tuple(Resolution.parse(r) for r in data.get("resolutions", ("640x480",)))
        values["measure"] = measure_from_dict(data.get("measure", {}))
        return cls(**values)


def measure_from_dict(data: Mapping[str, Any]) -> Measure:
    values = dict(data)
    values["prompt_lengths"] = tuple(values.get("prompt_lengths", ()))
    values["rpc_servers"] = tuple(values.get("rpc_servers", ()))
    values["override_tensor"] = tuple(values.get("override_tensor", ()))
    if values.get("tensor_split") is not None:
        values["tensor_split"] = tuple(values["tensor_split"])
    return Measure(**values)
