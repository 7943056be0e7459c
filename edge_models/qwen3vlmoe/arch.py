"""Qwen3-VL MoE -> GGUF: the dense family's map plus merged experts and the router.

Mirrors llama.cpp's Qwen3VLMoeTextModel (conversion/qwen3vl.py): each layer's
experts are stored fused in the checkpoint and become three GGUF tensors,
`ffn_gate_exps` / `ffn_up_exps` [experts, ff, hidden] and `ffn_down_exps`
[experts, hidden, ff] (numpy order); the router `mlp.gate` is `ffn_gate_inp`.

Two expert layouts exist. Hub checkpoints (transformers 4.57) keep the matmul's
input first: `gate_up_proj` [experts, hidden, 2*ff], `down_proj` [experts, ff,
hidden]. transformers 5 keeps [experts, out, in] in memory and writes it so:
`gate_up_proj` [experts, 2*ff, hidden], `down_proj` [experts, hidden, ff]. A
shape that fits one layout only decides; where both fit (gate_up when
hidden == 2*ff, down when hidden == ff) the checkpoint's own marker decides:
config.json's `transformers_version`, which save_pretrained always writes.
Without it such a tensor is refused, never guessed.
"""
from __future__ import annotations

import functools
import re
from dataclasses import replace
from typing import Any

import gguf
from gguf import MODEL_ARCH, MODEL_TENSOR, TENSOR_NAMES, GGUFWriter

from ..errors import ModelConfigError
from ..qwen3vl import arch as dense
from ..qwen3vl.config import MoeTextConfig, VisionConfig
from ..spec import ArchSpec, Checkpoint, TensorMapping

EXPERTS = re.compile(r"^model\.language_model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
LAYOUTS = ("hub", "hf5")  # [experts, in, out] (transformers 4.57, the hub) | [experts, out, in] (transformers 5)


def text_hparams(config: dict[str, Any]) -> MoeTextConfig:
    return MoeTextConfig.from_dict(config)


def write_text_metadata(w: GGUFWriter, ckpt: Checkpoint) -> None:
    dense.write_text_metadata(w, ckpt)
    hp = text_hparams(ckpt.config)
    w.add_expert_count(hp.n_expert)
    w.add_expert_used_count(hp.n_expert_used)
    w.add_expert_feed_forward_length(hp.n_ff_exp)


def layout_marker(config: dict[str, Any]) -> str | None:
    """The layout config.json's `transformers_version` implies (None: not recorded)."""
    m = re.match(r"\s*(\d+)\.", str(config.get("transformers_version") or ""))
    if m is None:
        return None
    return "hf5" if int(m[1]) >= 5 else "hub"


def expected_shapes(kind: str, hp: MoeTextConfig) -> dict[str, tuple[int, int, int]]:
    e, h, f = hp.n_expert, hp.n_embd, hp.n_ff_exp
    if kind == "gate_up_proj":
        return {"hub": (e, h, 2 * f), "hf5": (e, 2 * f, h)}
    return {"hub": (e, f, h), "hf5": (e, h, f)}


def expert_layout(name: str, shape: tuple[int, ...] | None, config: dict[str, Any]) -> str:
    """The layout of one fused expert tensor: its shape where only one layout fits, else the marker."""
    m = EXPERTS.fullmatch(name)
    assert m is not None, name
    fits = [lay for lay, s in expected_shapes(m[2], text_hparams(config)).items() if shape is None or s == shape]
    if not fits:
        want = " or ".join(str(list(s)) for s in expected_shapes(m[2], text_hparams(config)).values())
        raise ModelConfigError(f"checkpoint tensor {name!r} has shape {list(shape or ())}; config.json's "
                               f"num_experts / hidden_size / moe_intermediate_size imply {want}. config.json and "
                               "the safetensors disagree: use the config.json shipped with these weights.")
    if len(fits) == 1:
        return fits[0]
    marker = layout_marker(config)
    if marker is None:
        raise ModelConfigError(
            f"checkpoint tensor {name!r} {list(shape or ())} fits both expert layouts (hub [experts, in, out] and "
            "transformers 5 [experts, out, in]) and config.json has no 'transformers_version' to tell which; add the "
            "version of transformers that saved the weights to config.json (\"4.57.0\" for hub files).")
    return marker


def _gate(t, ff: int, layout: str):
    return t[:, :, :ff].transpose(0, 2, 1) if layout == "hub" else t[:, :ff, :]


def _up(t, ff: int, layout: str):
    return t[:, :, ff:].transpose(0, 2, 1) if layout == "hub" else t[:, ff:, :]


def _down_hub(t):
    return t.transpose(0, 2, 1)


def _exps(kind: MODEL_TENSOR, bid: int) -> str:
    return TENSOR_NAMES[kind].format(bid=bid) + ".weight"


def map_text_tensor(name: str, config: dict[str, Any], shape: tuple[int, ...] | None = None) -> list[TensorMapping]:
    m = EXPERTS.fullmatch(name)
    if m is None:
        return dense.map_text_tensor(name, config, shape, model_arch=MODEL_ARCH.QWEN3VLMOE)
    bid, layout = int(m[1]), expert_layout(name, shape, config)
    if m[2] == "down_proj":
        return [TensorMapping(_exps(MODEL_TENSOR.FFN_DOWN_EXP, bid), _down_hub if layout == "hub" else None,
                              by_rows=True)]
    ff = text_hparams(config).n_ff_exp
    return [TensorMapping(_exps(MODEL_TENSOR.FFN_GATE_EXP, bid), functools.partial(_gate, ff=ff, layout=layout), True),
            TensorMapping(_exps(MODEL_TENSOR.FFN_UP_EXP, bid), functools.partial(_up, ff=ff, layout=layout), True)]


def check_expert_layouts(ckpt: Checkpoint) -> None:
    """Both fused tensors of every layer read in one layout: a marker contradicted by a shape is refused."""
    by_layer: dict[int, dict[str, str]] = {}
    for name, ref in ckpt.tensors.items():
        m = EXPERTS.fullmatch(name)
        if m:
            by_layer.setdefault(int(m[1]), {})[name] = expert_layout(name, tuple(ref.shape), ckpt.config)
    for layer, layouts in sorted(by_layer.items()):
        if len(set(layouts.values())) > 1:
            detail = ", ".join(f"{n.rsplit('.', 1)[-1]} {list(ckpt.tensors[n].shape)} -> {lay}"
                               for n, lay in sorted(layouts.items()))
            raise ModelConfigError(
                f"{ckpt.model_dir}: layer {layer}'s experts read in two layouts ({detail}); config.json's "
                f"transformers_version {ckpt.config.get('transformers_version')!r} does not match how the weights "
                "were saved: fix it to the version that wrote them.")


def validate(ckpt: Checkpoint) -> None:
    text_hparams(ckpt.config)  # refuses configs llama.cpp's qwen3vlmoe cannot run
    dense.validate(ckpt)
    check_expert_layouts(ckpt)


def check_config(config: dict[str, Any], source: str) -> None:
    MoeTextConfig.from_dict(config, source)
    VisionConfig.from_dict(config, source)


_DENSE_TEXT, MMPROJ = dense.SPEC.outputs
SPEC = ArchSpec(
    name="qwen3vlmoe",
    hf_architectures=("Qwen3VLMoeForConditionalGeneration",),
    outputs=(
        replace(_DENSE_TEXT, gguf_arch=gguf.MODEL_ARCH_NAMES[MODEL_ARCH.QWEN3VLMOE], map_tensor=map_text_tensor,
                write_metadata=write_text_metadata,
                # llama.cpp's converter keeps the router f32 in f16/bf16 files (and llama-quantize never touches it)
                keep_f32=("ffn_gate_inp.weight",)),
        MMPROJ,  # the vision tower and projector are the dense family's
    ),
    validate=validate,
    check_config=check_config,
)
