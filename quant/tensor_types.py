"""Per-tensor types of a quantized file, by llama.cpp's rules (quant.rules), before anything is written.

text_types gives what llama_model_quantize chooses for the text model, in its
file order; mmproj_types what quant.mmproj writes for the projector.
"""
from __future__ import annotations

from typing import Iterable

from edge_common.gguf_plan import TensorSize

from . import catalog
from .mmproj import plan_tensor
from .rules import FLOATS, LAYER, TypeChoiceState, allows_quantization, category, tensor_type_for, type_fallback


def _llama_order(name: str) -> tuple[int, str]:
    m = LAYER.match(name)
    return (int(m[1]) if m else -1, name)


def text_types(tensors: Iterable[TensorSize], quant: str, *, imatrix: bool = False,
               pure: bool = False) -> list[TensorSize]:
    """The text model's tensors as llama_model_quantize would type them, in its file order."""
    t = catalog.lookup(quant)
    ts = sorted(tensors, key=lambda x: _llama_order(x.name))
    names = [x.name for x in ts]
    layers = {int(m[1]) for n in names if (m := LAYER.match(n))}
    q_rows = next((x.shape[1] for x in ts if x.name.endswith("attn_q.weight")), 1)
    k_rows = next((x.shape[1] for x in ts if x.name.endswith("attn_k.weight")), 1)
    qs = TypeChoiceState(n_gqa=q_rows / k_rows, n_layer=len(layers),
                n_attention_wv=sum(category(n) in ("attn_v", "qkv", "kv_b") for n in names),
                has_imatrix=imatrix, tied="output.weight" not in names,
                n_expert=next((x.shape[1] for x in ts if x.name.endswith("ffn_gate_inp.weight")), 0))
    out = []
    for x in ts:
        if not allows_quantization(x.name, len(x.shape)):
            out.append(x)
            continue
        new = t.ggml_type
        if new not in FLOATS:
            if not pure:
                new = tensor_type_for(qs, new, x.name, x.shape[0], t.ftype, category(x.name),
                                      stacked=len(x.shape) > 2 and x.shape[2] > 1)
            new = type_fallback(x.shape[0], new)
        out.append(TensorSize(x.name, x.shape, new))
    return out


def mmproj_types(tensors: Iterable[TensorSize], quant: str) -> list[TensorSize]:
    qt = catalog.lookup_projector(quant)
    out = []
    for x in tensors:
        p = plan_tensor(x.name, x.shape, x.ggml_type, qt.ggml_type)
        out.append(TensorSize(x.name, x.shape, p.dst_type))
    return out
