"""Qwen3-VL's config.json as typed values, for both layouts the hub and transformers use.

transformers 4.57 (as on the hub) keeps RoPE in `rope_scaling` with `rope_theta`
beside it; transformers 5 puts both in `rope_parameters`. `from_dict` reads
either and refuses what llama.cpp's `qwen3vl` / `qwen3vl_merger` cannot load.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ModelConfigError

VISION_LAYERNORM_EPS = 1e-6  # hard-coded in transformers' Qwen3VLVisionBlock


def _need(cfg: dict[str, Any], key: str, where: str) -> Any:
    if key not in cfg:
        raise ModelConfigError(f"config.json: {where} has no {key!r}; is this a complete Qwen3-VL config?")
    return cfg[key]


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
    def from_dict(cls, config: dict[str, Any]) -> "TextConfig":
        """The language model's hyper-parameters from a whole Qwen3-VL config.json."""
        tc = config.get("text_config")
        if not isinstance(tc, dict):
            raise ModelConfigError("config.json: no 'text_config' object; Qwen3-VL configs keep the language model there.")
        rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
        sections = list(rope.get("mrope_section") or [])
        if len(sections) != 3:
            raise ModelConfigError(
                "config.json: text_config rope parameters need 'mrope_section' with 3 entries (Qwen3-VL M-RoPE).")
        if rope.get("mrope_interleaved") is False:
            raise ModelConfigError(
                "config.json: non-interleaved M-RoPE is the Qwen2.5-VL scheme; Qwen3-VL interleaves it.")
        theta = rope.get("rope_theta", tc.get("rope_theta"))
        if theta is None:
            raise ModelConfigError(
                "config.json: text_config has no rope_theta (neither in rope_parameters nor at the top).")
        n_head = _need(tc, "num_attention_heads", "text_config")
        n_embd = _need(tc, "hidden_size", "text_config")
        head_dim = tc.get("head_dim") or n_embd // n_head
        if 2 * sum(sections) != head_dim:
            raise ModelConfigError(f"config.json: mrope_section {sections} must sum to head_dim/2 = {head_dim // 2}.")
        vc = config.get("vision_config") or {}
        n_layer = _need(tc, "num_hidden_layers", "text_config")
        n_deepstack = len(vc.get("deepstack_visual_indexes") or [])
        if n_deepstack >= n_layer:
            raise ModelConfigError(
                f"config.json: {n_deepstack} deepstack layers need more than {n_layer} text layers "
                "(llama.cpp injects one per layer)."
            )
        return cls(
            n_layer=n_layer,
            n_ctx=tc.get("max_position_embeddings", 262144),
            n_embd=n_embd,
            n_ff=_need(tc, "intermediate_size", "text_config"),
            n_head=n_head,
            n_head_kv=tc.get("num_key_value_heads", n_head),
            head_dim=head_dim,
            rms_eps=tc.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_sections=(*sections, 0),
            n_vocab=_need(tc, "vocab_size", "text_config"),
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
    def from_dict(cls, config: dict[str, Any]) -> "MoeTextConfig":
        dense = TextConfig.from_dict(config)
        tc = config["text_config"]
        # transformers 5's save_pretrained writes num_local_experts, the hub files num_experts.
        n_expert = tc.get("num_experts", tc.get("num_local_experts"))
        if n_expert is None:
            raise ModelConfigError("config.json: text_config has neither 'num_experts' nor 'num_local_experts'; "
                                   "is this a complete Qwen3-VL MoE config?")
        n_used = _need(tc, "num_experts_per_tok", "text_config")
        if not 0 < n_used <= n_expert:
            raise ModelConfigError(f"config.json: text_config num_experts_per_tok {n_used} must be in 1..num_experts "
                                   f"({n_expert}).")
        # llama.cpp's qwen3vlmoe routes every layer; dense layers between them are a different model.
        if tc.get("mlp_only_layers") or tc.get("decoder_sparse_step", 1) != 1:
            raise ModelConfigError("config.json: text_config mlp_only_layers / decoder_sparse_step make some layers "
                                   "dense; llama.cpp's qwen3vlmoe needs experts in every layer.")
        if tc.get("norm_topk_prob", True) is False:
            raise ModelConfigError("config.json: text_config norm_topk_prob false: llama.cpp's qwen3vlmoe always "
                                   "renormalizes the top-k routing weights.")
        return cls(**vars(dense), n_expert=int(n_expert), n_expert_used=int(n_used),
                   n_ff_exp=int(_need(tc, "moe_intermediate_size", "text_config")))


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
    def from_dict(cls, config: dict[str, Any]) -> "VisionConfig":
        """The vision tower's hyper-parameters from a whole Qwen3-VL config.json."""
        vc = config.get("vision_config")
        if not isinstance(vc, dict):
            raise ModelConfigError("config.json: no 'vision_config' object; a Qwen3-VL checkpoint has one.")
        required = ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size", "out_hidden_size")
        for key in required:
            _need(vc, key, "vision_config")
        if vc.get("temporal_patch_size", 2) != 2:
            raise ModelConfigError("config.json: llama.cpp's projector supports temporal_patch_size 2 only.")
        return cls(*(int(vc[k]) for k in required), spatial_merge_size=int(vc.get("spatial_merge_size", 2)),
                   num_position_embeddings=int(vc.get("num_position_embeddings", 2304)),
                   deepstack_visual_indexes=tuple(vc.get("deepstack_visual_indexes") or ()))
