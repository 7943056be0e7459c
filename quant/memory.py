"""Runtime memory beyond the weights: llama.cpp's compute buffers for the text model and the projector.

KV-cache bytes are exact (quant.kv, as llama.cpp allocates them); compute
buffers are estimates checked against llama.cpp's reported sizes for the 2B shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from edge_common.gguf_plan import TensorSize
from edge_models import VisionFacts

from . import kv
from .errors import QuantError
from .rules import LAYER


@dataclass(frozen=True)
class TextDims:
    n_layer: int
    n_embd: int
    n_ff: int
    n_vocab: int
    k_row: int  # n_head_kv * head_dim
    v_row: int
    q_row: int  # n_head * head_dim

    @classmethod
    def of(cls, tensors: Iterable[TensorSize], experts_used: int = 0) -> "TextDims":
        """n_ff of an MoE model: the FFN width one token runs through (experts used x expert width)."""
        by = {t.name: t.shape for t in tensors}

        def first(suffix: str) -> tuple[int, ...]:
            for n, s in by.items():
                if n.endswith(suffix):
                    return s
            raise QuantError(f"the text model has no '*{suffix}' tensor; cannot size its KV cache.")

        layers = {int(m[1]) for n in by if (m := LAYER.match(n))}
        emb = by.get("token_embd.weight") or first("token_embd.weight")
        if any(n.endswith("ffn_up_exps.weight") for n in by):
            n_ff = first("ffn_up_exps.weight")[1] * max(1, experts_used)
        else:
            n_ff = first("ffn_up.weight")[1]
        return cls(len(layers), emb[0], n_ff, emb[1], first("attn_k.weight")[1],
                   first("attn_v.weight")[1], first("attn_q.weight")[1])


def compute_bytes(d: TextDims, n_ctx: int, n_ubatch: int = 512) -> int:
    """Text compute + output buffers as llama.cpp reserves them on CPU (flash attention on, its default there).

    The worst-case graph of one ubatch is dominated by logits for every token
    and the gate/up activations: 4 * ubatch * (n_vocab + 2 * n_ff) bytes,
    which is llama.cpp's reported compute buffer for the Qwen3-VL-2B shapes to
    the byte (320.75 MiB at n_ubatch 512); n_embd per token is added as margin.
    """
    u = min(n_ubatch, kv.padded_ctx(n_ctx))
    return 4 * u * (d.n_vocab + 2 * d.n_ff + d.n_embd) + 4 * d.n_vocab


def vision_compute_bytes(mmproj: Iterable[TensorSize], vision: VisionFacts, image_patches: int | None = None) -> int:
    """Projector compute buffer by the family's formula, for the image mtmd warms up with unless told."""
    ups = [t.shape for t in mmproj if t.name.endswith("ffn_up.weight")]
    if not ups:
        return 0
    d, ff = ups[0][0], ups[0][1]
    return vision.projector_compute_bytes(vision.warmup_patches if image_patches is None else image_patches, d, ff)
