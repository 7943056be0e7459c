"""Qwen3-VL's config.json as typed values, for both layouts the hub and transformers use.

transformers 4.57 (as on the hub) keeps RoPE in `rope_scaling` with `rope_theta`
beside it; transformers 5 puts both in `rope_parameters`. `from_dict` reads
either and refuses what llama.cpp's `qwen3vl` / `qwen3vl_merger` cannot load.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ModelConfigError

VISION_LAYERNORM_EPS = 1e-6  # hard-coded in transformers' Qwen3VLVisionBlock


_REQUIRED = object()


def _need(cfg: dict[str, Any], key: str, where: str, source: str = "config.json") -> Any:
    if key not in cfg:
        raise ModelConfigError(f"{source}: {where} has no {key!r}; is this a complete Qwen3-VL config?")
    return cfg[key]


def _int(cfg: dict[str, Any], key: str, where: str, source: str, default: Any = _REQUIRED, minimum: int = 1) -> int:
    """A whole number >= `minimum` (a string, float, bool or negative is refused naming the file and field)."""
    value = _need(cfg, key, where, source) if default is _REQUIRED else cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelConfigError(f"{source}: {where}.{key} must be a whole number >= {minimum}, got {value!r}; "
                               "use the config.json shipped with these weights.")
    return value


def _float(cfg: dict[str, Any], key: str, where: str, source: str, default: Any = _REQUIRED) -> float:
    """A finite number > 0."""
    value = _need(cfg, key, where, source) if default is _REQUIRED else cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ModelConfigError(f"{source}: {where}.{key} must be a finite number > 0, got {value!r}; "
                               "use the config.json shipped with these weights.")
    return float(value)


def _ints(values: Any, key: str, where: str, source: str, minimum: int = 0) -> tuple[int, ...]:
    if values is None:
        return ()
    if not isinstance(values, list):
        raise ModelConfigError(f"{source}: {where}.{key} must be a list of whole numbers, got {values!r}.")
    return tuple(_int({key: v}, key, where, source, minimum=minimum) for v in values)


@dataclass(frozen=True)
class TextConfig:
    n_layer: int
    n_ctx: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    rope_sections: tuple[int, int, int, int]
    n_vocab: int
    tied: bool
    n_deepstack: int

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config.json") -> "TextConfig":
        """The language model's hyper-parameters from a whole Qwen3-VL config.json (`source` names it)."""
        tc = config.get("text_config")
        if not isinstance(tc, dict):
            raise ModelConfigError(f"{source}: no 'text_config' object; Qwen3-VL configs keep the language model there.")
        rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ModelConfigError(f"{source}: text_config rope parameters must be an object, got {rope!r}.")
        sections = list(_ints(rope.get("mrope_section"), "mrope_section", "text_config.rope_parameters", source))
        if len(sections) != 3:
            raise ModelConfigError(
                f"{source}: text_config rope parameters need 'mrope_section' with 3 entries (Qwen3-VL M-RoPE).")
        if rope.get("mrope_interleaved") is False:
            raise ModelConfigError(
                f"{source}: non-interleaved M-RoPE is the Qwen2.5-VL scheme; Qwen3-VL interleaves it.")
        if rope.get("rope_theta", tc.get("rope_theta")) is None:
            raise ModelConfigError(
                f"{source}: text_config has no rope_theta (neither in rope_parameters nor at the top).")
        theta = _float(rope if "rope_theta" in rope else tc, "rope_theta", "text_config", source)
        n_head = _int(tc, "num_attention_heads", "text_config", source)
        n_embd = _int(tc, "hidden_size", "text_config", source)
        head_dim = _int(tc, "head_dim", "text_config", source, None) if tc.get("head_dim") else n_embd // n_head
        if 2 * sum(sections) != head_dim:
            raise ModelConfigError(f"{source}: mrope_section {sections} must sum to head_dim/2 = {head_dim // 2}.")
        vc = config.get("vision_config") or {}
        if not isinstance(vc, dict):
            raise ModelConfigError(f"{source}: 'vision_config' must be an object.")
        n_layer = _int(tc, "num_hidden_layers", "text_config", source)
        n_deepstack = len(_ints(vc.get("deepstack_visual_indexes"), "deepstack_visual_indexes", "vision_config",
                                source))
        if n_deepstack >= n_layer:
            raise ModelConfigError(
                f"{source}: {n_deepstack} deepstack layers need more than {n_layer} text layers "
                "(llama.cpp injects one per layer)."
            )
        return cls(
            n_layer=n_layer,
            n_ctx=_int(tc, "max_position_embeddings", "text_config", source, 262144),
            n_embd=n_embd,
            n_ff=_int(tc, "intermediate_size", "text_config", source),
            n_head=n_head,
            n_head_kv=_int(tc, "num_key_value_heads", "text_config", source, n_head),
            head_dim=head_dim,
            rms_eps=_float(tc, "rms_norm_eps", "text_config", source, 1e-6),
            rope_theta=theta,
            rope_sections=(*sections, 0),
            n_vocab=_int(tc, "vocab_size", "text_config", source),
            tied=bool(config.get("tie_word_embeddings", tc.get("tie_word_embeddings", False))),
            n_deepstack=n_deepstack,
        )


@dataclass(frozen=True)
class MoeTextConfig(TextConfig):
    """The MoE language model (30B-A3B, 235B-A22B): every layer's FFN is routed experts, none shared."""

    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config.json") -> "MoeTextConfig":
        dense = TextConfig.from_dict(config, source)
        tc = config["text_config"]
        # transformers 5's save_pretrained writes num_local_experts, the hub files num_experts.
        n_expert = tc.get("num_experts", tc.get("num_local_experts"))
        if n_expert is not None:
            n_expert = _int({"num_experts": n_expert}, "num_experts", "text_config", source)
        if n_expert is None:
            raise ModelConfigError(f"{source}: text_config has neither 'num_experts' nor 'num_local_experts'; "
                                   "is this a complete Qwen3-VL MoE config?")
        n_used = _int(tc, "num_experts_per_tok", "text_config", source)
        if not 0 < n_used <= n_expert:
            raise ModelConfigError(f"{source}: text_config num_experts_per_tok {n_used} must be in 1..num_experts "
                                   f"({n_expert}).")
        # llama.cpp's qwen3vlmoe routes every layer; dense layers between them are a different model.
        if tc.get("mlp_only_layers") or tc.get("decoder_sparse_step", 1) != 1:
            raise ModelConfigError(f"{source}: text_config mlp_only_layers / decoder_sparse_step make some layers "
                                   "dense; llama.cpp's qwen3vlmoe needs experts in every layer.")
        if tc.get("norm_topk_prob", True) is False:
            raise ModelConfigError(f"{source}: text_config norm_topk_prob false: llama.cpp's qwen3vlmoe always "
                                   "renormalizes the top-k routing weights.")
        return cls(**vars(dense), n_expert=int(n_expert), n_expert_used=int(n_used),
                   n_ff_exp=_int(tc, "moe_intermediate_size", "text_config", source))


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    patch_size: int
    out_hidden_size: int
    spatial_merge_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config.json") -> "VisionConfig":
        """The vision tower's hyper-parameters from a whole Qwen3-VL config.json (`source` names it)."""
        vc = config.get("vision_config")
        if not isinstance(vc, dict):
            raise ModelConfigError(f"{source}: no 'vision_config' object; a Qwen3-VL checkpoint has one.")
        required = ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size", "out_hidden_size")
        values = [_int(vc, key, "vision_config", source) for key in required]
        if _int(vc, "temporal_patch_size", "vision_config", source, 2) != 2:
            raise ModelConfigError(f"{source}: llama.cpp's projector supports temporal_patch_size 2 only.")
        return cls(*values, spatial_merge_size=_int(vc, "spatial_merge_size", "vision_config", source, 2),
                   num_position_embeddings=_int(vc, "num_position_embeddings", "vision_config", source, 2304),
                   deepstack_visual_indexes=_ints(vc.get("deepstack_visual_indexes"), "deepstack_visual_indexes",
                                                  "vision_config", source))
