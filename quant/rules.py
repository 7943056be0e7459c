"""llama.cpp's quantization rules as data and small functions, in one place.

Each table names the llama.cpp source it mirrors (src/llama-quant.cpp at the
version llama-cpp-python 0.3.36 vendors). The size estimate (quant.estimate)
and the projector quantizer (quant.mmproj) both read them, so a rule changes
here once; tests check the port tensor by tensor against llama_model_quantize.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as G

from edge_common.floats import FLOAT_GGML_TYPES
from edge_common.preflight import CLIP_F32_ONLY

from . import catalog
from .errors import QuantError

# llama-quant.cpp tensor_allows_quantization: name fragments it never quantizes
# (1-D tensors and the multimodal ones among them).
NO_QUANTIZE = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight",
    "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd",
    "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
    "mm.a.code_embd",
)
# llama-quant.cpp tensor_allows_quantization: exact names it never quantizes.
NO_QUANTIZE_EXACT = ("position_embd.weight", "token_types.weight")
# clip resizes these with ggml_interpolate, which takes F32 only (llama.cpp's convert_hf_to_gguf forces F32 too).
FORCE_F32 = CLIP_F32_ONLY
# llama-quant.cpp tensor_type_fallback: a type with 32-element blocks of the same or more bits.
FALLBACK = {G.IQ1_S: G.IQ4_NL, G.IQ1_M: G.IQ4_NL, G.IQ2_XXS: G.IQ4_NL, G.IQ2_XS: G.IQ4_NL, G.IQ2_S: G.IQ4_NL,
            G.IQ3_XXS: G.IQ4_NL, G.IQ3_S: G.IQ4_NL, G.IQ4_XS: G.IQ4_NL, G.Q2_K: G.Q4_0, G.Q3_K: G.Q4_0,
            G.TQ1_0: G.Q4_0, G.TQ2_0: G.Q4_0, G.Q4_K: G.Q5_0, G.Q5_K: G.Q5_1, G.Q6_K: G.Q8_0}
LAYER = re.compile(r"^blk\.(\d+)\.")
FTYPE = {t.name: t.ftype for t in catalog.TYPES}  # catalog name -> llama_ftype
IQ2_LIKE = {FTYPE["iq2_xxs"], FTYPE["iq2_xs"], FTYPE["iq1_s"], FTYPE["iq2_s"], FTYPE["iq2_m"], FTYPE["iq1_m"]}
FLOATS = FLOAT_GGML_TYPES


def allows_quantization(name: str, n_dims: int, quantize_output: bool = True) -> bool:
    if n_dims < 2 or not name.endswith("weight"):
        return False
    if name == "output.weight" and not quantize_output:
        return False
    return name not in NO_QUANTIZE_EXACT and not any(k in name for k in NO_QUANTIZE)


def category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "qkv"), ("attn_kv_b.weight", "kv_b"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _blck(t: G) -> int:
    return GGML_QUANT_SIZES[t][0]


def type_fallback(ne0: int, t: G) -> G:
    """tensor_type_fallback: a 32-block type when ne0 does not fit, F16 when nothing fits."""
    if ne0 % _blck(t) == 0:
        return t
    new = FALLBACK.get(t, t)
    return new if ne0 % _blck(new) == 0 else G.F16


@dataclass
class TypeChoiceState:
    n_gqa: float
    n_layer: int
    n_attention_wv: int
    has_imatrix: bool
    tied: bool
    n_expert: int = 0  # hparams.n_expert: 0 for a dense model
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0


def _layer(qs: TypeChoiceState, counter: int, name: str) -> int:
    """layer_info: the running count for a dense model, the block number in the name for an MoE one."""
    if qs.n_expert > 1:
        m = LAYER.match(name)
        if m is None:
            raise QuantError(f"cannot tell the layer of tensor {name!r}")
        return int(m[1])
    return counter


# llama_tensor_get_type_impl: the file types whose attn_output gets Q5_K in an 8-expert model.
ATTN_OUTPUT_Q5_K_8_EXPERTS = ("q2_k", "iq3_xs", "iq3_xxs", "q3_k_s", "q3_k_m", "iq4_nl", "q4_k_s", "q4_k_m", "iq3_s",
                              "iq3_m", "iq4_xs")


def _attn_v_type(qs: TypeChoiceState, i: int, new: G, ftype: int) -> G:
    """The attn_v / qkv / kv_b chain of llama_tensor_get_type_impl (i: their running count)."""
    n = qs.n_attention_wv
    if qs.n_expert == 8:  # "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
        return G.Q8_0
    if ftype == FTYPE["q2_k"]:
        return G.Q4_K if qs.n_gqa >= 4 else G.Q3_K
    if ftype == FTYPE["q2_k_s"] and qs.n_gqa >= 4:
        return G.Q4_K
    if ftype == FTYPE["iq3_xxs"]:
        return G.Q4_K if qs.n_gqa >= 4 else (G.IQ3_S if not qs.has_imatrix else G.IQ3_XXS)
    if ftype in (FTYPE["iq3_xs"], FTYPE["iq3_s"]) and qs.n_gqa >= 4:
        return G.Q4_K
    if ftype == FTYPE["iq3_m"]:
        return G.Q4_K
    if ftype == FTYPE["q3_k_m"]:
        return G.Q5_K if i < 2 else G.Q4_K
    if ftype == FTYPE["q3_k_l"]:
        return G.Q5_K
    if ftype in (FTYPE["iq4_nl"], FTYPE["iq4_xs"]) and qs.n_gqa >= 4:
        return G.Q5_K
    if ftype in (FTYPE["q4_k_m"], FTYPE["q5_k_m"]) and _use_more_bits(i, n):
        return G.Q6_K
    if ftype == FTYPE["q4_k_s"] and i < 4:
        return G.Q5_K
    return new


def _ffn_down_type(qs: TypeChoiceState, i: int, new: G, ftype: int) -> G:
    """The ffn_down chain (i: the layer, from layer_info)."""
    n = qs.n_layer
    if ftype == FTYPE["q2_k"]:
        return G.Q3_K
    if ftype == FTYPE["q2_k_s"]:
        return G.Q4_K if i < n // 8 else new
    if ftype == FTYPE["iq3_xxs"] and not qs.has_imatrix:
        return G.Q4_K if i < n // 8 else G.Q3_K
    if ftype == FTYPE["q3_k_m"]:
        return G.Q5_K if i < n // 16 else G.Q4_K
    if ftype == FTYPE["iq3_m"] and (i < n // 8 or (qs.n_expert == 8 and _use_more_bits(i, n))):
        return G.Q4_K
    if ftype == FTYPE["q3_k_l"]:
        return G.Q5_K
    if ftype == FTYPE["q4_k_m"]:
        return G.Q6_K if _use_more_bits(i, n) else new
    if i < n // 8 and ftype in (FTYPE["iq4_nl"], FTYPE["iq4_xs"]) and not qs.has_imatrix:
        return G.Q5_K
    if ftype == FTYPE["q5_k_m"] and _use_more_bits(i, n):
        return G.Q6_K
    if ftype == FTYPE["q4_k_s"] and i < n // 8:
        return G.Q5_K
    if ftype in (FTYPE["q4_0"], FTYPE["q5_0"]) and qs.has_imatrix and i < n // 8:
        return G.Q4_1 if ftype == FTYPE["q4_0"] else G.Q5_1
    return new


def tensor_type_for(qs: TypeChoiceState, new: G, name: str, ne0: int, ftype: int, cat: str,
                    stacked: bool = False) -> G:
    """llama_tensor_get_type_impl for a non-Falcon model, dense or MoE (`new`: the file type's default type).

    MoE expert tensors (ffn_*_exps) fall in the ffn_* categories by name, as in llama.cpp; the
    router (ffn_gate_inp) is never quantized (NO_QUANTIZE). `stacked`: a 3-D tensor of several
    matrices (ne[2] > 1, the experts), which mxfp4_moe alone looks at.
    """
    attn_v_like = cat in ("attn_v", "qkv", "kv_b")
    eight_experts = qs.n_expert == 8
    if cat == "output" or (qs.tied and cat == "token_embd"):
        if ftype == FTYPE["mxfp4_moe"] or ne0 % _blck(new) != 0:
            return G.Q8_0
        if ftype in IQ2_LIKE or ftype == FTYPE["iq3_xxs"]:
            return G.Q5_K
        return G.Q6_K if new != G.Q8_0 else new
    if ftype == FTYPE["mxfp4_moe"]:  # "MoE tensors -> MXFP4, other tensors -> Q8_0"
        return G.MXFP4 if stacked else G.Q8_0
    if cat == "token_embd":
        if ftype in (FTYPE["iq2_xxs"], FTYPE["iq2_xs"], FTYPE["iq1_s"], FTYPE["iq1_m"]):
            return G.Q2_K
        if ftype in (FTYPE["iq2_s"], FTYPE["iq2_m"], FTYPE["iq3_xxs"]):
            return G.IQ3_S
        if ftype in (FTYPE["tq1_0"], FTYPE["tq2_0"]):
            return G.Q4_K
        return new
    if ftype in IQ2_LIKE:
        iq2s = ftype in (FTYPE["iq2_s"], FTYPE["iq2_m"])
        if attn_v_like:
            qs.i_attention_wv += 1
            return G.Q4_K if qs.n_gqa >= 4 or qs.n_expert >= 4 else (G.IQ3_S if iq2s else G.Q2_K)
        if eight_experts and cat == "attn_k":
            return G.Q4_K
        if cat == "ffn_down":
            i = qs.i_ffn_down  # this branch counts, even in an MoE model
            qs.i_ffn_down += 1
            return (G.IQ3_S if iq2s else G.Q2_K) if i < qs.n_layer // 8 else new
        if cat == "attn_output":
            if eight_experts:
                return G.Q5_K
            if ftype in (FTYPE["iq1_s"], FTYPE["iq1_m"]):
                return G.IQ2_XXS
            if iq2s:
                return G.IQ3_S
        return new
    if attn_v_like:
        qs.i_attention_wv += 1
        return _attn_v_type(qs, qs.i_attention_wv - 1, new, ftype)
    if cat == "attn_k" and eight_experts:
        return G.Q8_0
    if cat in ("attn_k", "attn_q"):
        if ftype == FTYPE["iq3_xs"]:
            return G.IQ3_XXS
        if ftype == FTYPE["iq3_xxs"]:
            return G.IQ2_S
        return new
    if cat == "ffn_down":
        i = _layer(qs, qs.i_ffn_down, name)
        qs.i_ffn_down += 1
        return _ffn_down_type(qs, i, new, ftype)
    if cat == "attn_output":
        if eight_experts:
            return G.Q5_K if ftype in {FTYPE[q] for q in ATTN_OUTPUT_Q5_K_8_EXPERTS} else new
        return {FTYPE["q2_k"]: G.Q3_K, FTYPE["iq3_xxs"]: G.IQ3_S, FTYPE["q3_k_m"]: G.Q4_K, FTYPE["q3_k_l"]: G.Q5_K,
                FTYPE["iq3_m"]: G.Q4_K}.get(ftype, new)
    if cat == "qkv":  # unreachable (attn_v_like above), kept for parity with llama.cpp's chain
        return new
    if cat in ("ffn_gate", "ffn_up"):
        attr = "i_ffn_gate" if cat == "ffn_gate" else "i_ffn_up"
        i = _layer(qs, getattr(qs, attr), name)
        setattr(qs, attr, getattr(qs, attr) + 1)
        if ftype == FTYPE["iq3_xs"] and qs.n_layer // 8 <= i < 7 * qs.n_layer // 8:
            return G.IQ3_XXS
        return new
    return new
