"""Every quantization type we offer, as llama.cpp's quantize tool names it.

One table, so the CLI, the planner and the quantizers agree on what a name
means: its `llama_ftype` (what llama_model_quantize takes), the ggml type most
tensors get, nominal bits per weight of that ggml type, whether an importance
matrix is required, and whether the name also works for the projector (where
names map straight to ggml types: `q4_k` means every eligible tensor in Q4_K).
Values are copied from llama.h / ggml.h of the llama.cpp vendored by
llama-cpp-python 0.3.36; tests check them against gguf-py and the C library.
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as G

from .errors import QuantError


@dataclass(frozen=True)
class QuantType:
    name: str  # lowercase llama-quantize name, e.g. "q4_k_m"
    ftype: int  # enum llama_ftype
    ggml_type: G  # the type most 2-D weights get (llama_ftype_get_default_type)
    needs_imatrix: bool
    usable_for_projector: bool
    description: str
    alias_of: str | None = None  # llama-quantize aliases: q4_k == q4_k_m for the text model

    @property
    def is_float(self) -> bool:
        return self.ggml_type in (G.F32, G.F16, G.BF16)

    @property
    def bits_per_weight(self) -> float:
        """Nominal bits per weight of the base ggml type (a mix's real average differs)."""
        return ggml_bits_per_weight(self.ggml_type)


def ggml_bits_per_weight(t: G) -> float:
    block, nbytes = GGML_QUANT_SIZES[t]
    return nbytes * 8 / block


def _t(name, ftype, gt, desc, imatrix=False, proj=False, alias=None) -> QuantType:
    return QuantType(name, ftype, gt, imatrix, proj, desc, alias)


# Order: largest first, as a user reads a table of choices.
# needs_imatrix: llama.cpp refuses iq1_*, iq2_*, iq3_xxs, iq3_xs and q2_k_s without one
# (tensor_requires_imatrix); iq3_s / iq3_m run without one but degrade badly, so we
# require it for every iq1/iq2/iq3 type, as the issue asks.
TYPES: tuple[QuantType, ...] = (
    _t("f32", 0, G.F32, "32-bit float, no loss", proj=True),
    _t("f16", 1, G.F16, "16-bit float, practically lossless", proj=True),
    _t("bf16", 32, G.BF16, "bfloat16, practically lossless", proj=True),
    _t("q8_0", 7, G.Q8_0, "8-bit, +0.0026 ppl @ Llama-3-8B", proj=True),
    _t("q6_k", 18, G.Q6_K, "6-bit k-quant, +0.0217 ppl @ Llama-3-8B", proj=True),
    _t("q5_k_m", 17, G.Q5_K, "5-bit k-quant mix, +0.0569 ppl @ Llama-3-8B"),
    _t("q5_k", 17, G.Q5_K, "alias of q5_k_m (projector: every weight Q5_K)", proj=True, alias="q5_k_m"),
    _t("q5_k_s", 16, G.Q5_K, "5-bit k-quant, +0.1049 ppl @ Llama-3-8B"),
    _t("q5_1", 9, G.Q5_1, "5-bit with offset, +0.1062 ppl @ Llama-3-8B"),
    _t("q5_0", 8, G.Q5_0, "5-bit, +0.1316 ppl @ Llama-3-8B"),
    _t("q4_k_m", 15, G.Q4_K, "4-bit k-quant mix, +0.1754 ppl @ Llama-3-8B (recommended)"),
    _t("q4_k", 15, G.Q4_K, "alias of q4_k_m (projector: every weight Q4_K)", proj=True, alias="q4_k_m"),
    _t("q4_k_s", 14, G.Q4_K, "4-bit k-quant, +0.2689 ppl @ Llama-3-8B"),
    _t("q4_1", 3, G.Q4_1, "4-bit with offset, +0.4511 ppl @ Llama-3-8B"),
    _t("q4_0", 2, G.Q4_0, "4-bit, +0.4685 ppl @ Llama-3-8B", proj=True),
    _t("iq4_nl", 25, G.IQ4_NL, "4.5 bpw non-linear"),
    _t("iq4_xs", 30, G.IQ4_XS, "4.25 bpw non-linear"),
    _t("mxfp4_moe", 38, G.MXFP4, "MoE experts in MXFP4 (4.25 bpw), every other weight Q8_0 (a dense model: "
       "all Q8_0)"),
    _t("q3_k_l", 13, G.Q3_K, "3-bit k-quant mix, +0.5562 ppl @ Llama-3-8B"),
    _t("q3_k_m", 12, G.Q3_K, "3-bit k-quant mix, +0.6569 ppl @ Llama-3-8B"),
    _t("q3_k", 12, G.Q3_K, "alias of q3_k_m", alias="q3_k_m"),
    _t("q3_k_s", 11, G.Q3_K, "3-bit k-quant, +1.6321 ppl @ Llama-3-8B"),
    _t("iq3_m", 27, G.IQ3_S, "3.66 bpw mix", imatrix=True),
    _t("iq3_s", 26, G.IQ3_S, "3.44 bpw", imatrix=True),
    _t("iq3_xs", 22, G.IQ3_S, "3.3 bpw", imatrix=True),
    _t("iq3_xxs", 23, G.IQ3_XXS, "3.06 bpw", imatrix=True),
    _t("q2_k", 10, G.Q2_K, "2-bit k-quant mix, +3.5199 ppl @ Llama-3-8B"),
    _t("q2_k_s", 21, G.Q2_K, "2-bit k-quant, +3.1836 ppl @ Llama-3-8B", imatrix=True),
    _t("iq2_m", 29, G.IQ2_S, "2.7 bpw", imatrix=True),
    _t("iq2_s", 28, G.IQ2_XS, "2.5 bpw", imatrix=True),
    _t("iq2_xs", 20, G.IQ2_XS, "2.31 bpw", imatrix=True),
    _t("iq2_xxs", 19, G.IQ2_XXS, "2.06 bpw", imatrix=True),
    _t("tq2_0", 37, G.TQ2_0, "2.06 bpw ternary (only for ternary-trained models)"),
    _t("iq1_m", 31, G.IQ1_M, "1.75 bpw", imatrix=True),
    _t("tq1_0", 36, G.TQ1_0, "1.69 bpw ternary (only for ternary-trained models)"),
    _t("iq1_s", 24, G.IQ1_S, "1.56 bpw", imatrix=True),
)
_BY_NAME = {t.name: t for t in TYPES}


def names(*, aliases: bool = False) -> tuple[str, ...]:
    """Type names for the text model, largest first."""
    return tuple(t.name for t in TYPES if aliases or t.alias_of is None)


def projector_names() -> tuple[str, ...]:
    return tuple(t.name for t in TYPES if t.usable_for_projector)


def lookup(name: str) -> QuantType:
    """The catalog entry for `name` (case-insensitive), or a QuantError listing the valid names."""
    t = _BY_NAME.get(str(name).strip().lower())
    if t is None:
        raise QuantError(f"unknown quantization type {name!r}; choose one of: {', '.join(names(aliases=True))}.")
    return t


def lookup_projector(name: str) -> QuantType:
    """Like lookup(), for --mmproj-quant: only types that map to one ggml type."""
    t = _BY_NAME.get(str(name).strip().lower())
    if t is None or not t.usable_for_projector:
        raise QuantError(
            f"unsupported projector type {name!r}; choose one of: {', '.join(projector_names())} "
            "(mixes such as q4_k_m are text-model recipes; the projector takes one ggml type)."
        )
    return t


def canonical(name: str) -> str:
    """The non-alias name: 'q4_k' -> 'q4_k_m' (for text-model file names)."""
    t = lookup(name)
    return t.alias_of or t.name


def default_projector_type(text_quant: str) -> str:
    """q8_0 when the text model is quantized, else the text model's float type."""
    t = lookup(text_quant)
    return t.name if t.is_float else "q8_0"
