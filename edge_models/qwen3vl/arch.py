"""Qwen3-VL (dense: 2B/4B/8B/32B) -> GGUF: the tensor-name map and metadata the converter follows.

Mirrors llama.cpp's conversion (conversion/qwen3vl.py) so the files load in its
`qwen3vl` text model and its `qwen3vl_merger` clip projector. Both config
layouts are read: transformers 4.57 (`rope_scaling` + `rope_theta`, as on the
hub) and transformers 5 (`rope_parameters`).
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any

import gguf
from gguf import MODEL_ARCH, MODEL_TENSOR, TENSOR_NAMES, GGUFWriter

from ..errors import ModelConfigError
from ..spec import ArchSpec, BpeTokenizer, Checkpoint, OutputFile, TensorMapping
from .config import VISION_LAYERNORM_EPS, TextConfig, VisionConfig

TEXT_PREFIX = "model.language_model."
VISION_PREFIX = "model.visual."
LM_HEAD = "lm_head.weight"
TOKENIZER_PRE = "qwen2"  # llama.cpp pre-tokenizer of the Qwen2/2.5/3 family
PREPROCESSOR_CONFIG = "preprocessor_config.json"
# Rename prefixes so gguf-py's TensorNameMap recognises the names.
TEXT_RENAME = ("model.language_model.", "model.")
VISION_RENAME = ("model.visual.", "visual.")
MERGER_FC = {"linear_fc1": 0, "linear_fc2": 2}  # llama.cpp's mm.0 / mm.2, as for Qwen2-VL
DEEPSTACK_PARTS = {"norm": MODEL_TENSOR.V_DS_NORM, "linear_fc1": MODEL_TENSOR.V_DS_FC1, "linear_fc2": MODEL_TENSOR.V_DS_FC2}
PATCH_EMBD = TENSOR_NAMES[MODEL_TENSOR.V_ENC_EMBD_PATCH]


def text_hparams(config: dict[str, Any]) -> TextConfig:
    return TextConfig.from_dict(config)


def vision_config(config: dict[str, Any]) -> VisionConfig:
    return VisionConfig.from_dict(config)


# --- text model -------------------------------------------------------------

def write_text_metadata(w: GGUFWriter, ckpt: Checkpoint) -> None:
    hp = text_hparams(ckpt.config)
    w.add_name(ckpt.model_dir.name)
    w.add_block_count(hp.n_layer)
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.n_embd)
    w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_key_length(hp.head_dim)
    w.add_value_length(hp.head_dim)
    w.add_layer_norm_rms_eps(hp.rms_eps)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_rope_dimension_sections(list(hp.rope_sections))
    w.add_num_deepstack_layers(hp.n_deepstack)


@functools.lru_cache(maxsize=8)
def _name_map(arch: MODEL_ARCH, n_blocks: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(arch, n_blocks)


def map_text_tensor(name: str, config: dict[str, Any], shape: tuple[int, ...] | None = None, *,
                    model_arch: MODEL_ARCH = MODEL_ARCH.QWEN3VL) -> list[TensorMapping]:
    """gguf-py's name table for `model_arch` (the MoE sibling passes its own)."""
    renamed = name.replace(*TEXT_RENAME, 1)
    new = _name_map(model_arch, text_hparams(config).n_layer).get_name(renamed, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise ModelConfigError(f"checkpoint tensor {name!r} is not part of the Qwen3-VL language model.")
    return [TensorMapping(new)]


def skip_text_tensor(name: str, config: dict[str, Any]) -> bool:
    # Some tied checkpoints still store lm_head; llama.cpp reuses token_embd then.
    return name == LM_HEAD and text_hparams(config).tied


def claims_text(name: str) -> bool:
    return name.startswith(TEXT_PREFIX) or name == LM_HEAD


# --- projector ----------------------------------------------------------------

def write_vision_metadata(w: GGUFWriter, ckpt: Checkpoint) -> None:
    vc = vision_config(ckpt.config)
    pre = ckpt.json(PREPROCESSOR_CONFIG, "the image preprocessor config")
    for key in ("image_mean", "image_std"):
        if key not in pre:
            raise ModelConfigError(f"{ckpt.model_dir / PREPROCESSOR_CONFIG}: has no {key!r}.")
    n_pos = vc.num_position_embeddings
    patch = vc.patch_size
    deepstack = set(vc.deepstack_visual_indexes)
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(ckpt.model_dir.name)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(gguf.VisionProjectorType.QWEN3VL)
    w.add_vision_projection_dim(vc.out_hidden_size)
    w.add_vision_image_size(int(math.isqrt(n_pos) * patch))
    w.add_vision_patch_size(patch)
    w.add_vision_embedding_length(vc.hidden_size)
    w.add_vision_feed_forward_length(vc.intermediate_size)
    w.add_vision_block_count(vc.depth)
    w.add_vision_head_count(vc.num_heads)
    w.add_vision_attention_layernorm_eps(VISION_LAYERNORM_EPS)
    w.add_vision_image_mean(pre["image_mean"])
    w.add_vision_image_std(pre["image_std"])
    w.add_vision_use_gelu(True)
    w.add_vision_spatial_merge_size(vc.spatial_merge_size)
    # The processor's resize bounds, so the runtime resizes as transformers does for any budget.
    size = pre.get("size") or {}
    min_px = size.get("shortest_edge", pre.get("min_pixels"))
    max_px = size.get("longest_edge", pre.get("max_pixels"))
    if min_px and max_px:
        w.add_vision_min_pixels(int(min_px))
        w.add_vision_max_pixels(int(max_px))
    w.add_vision_is_deepstack_layers([i in deepstack for i in range(vc.depth)])


def _patch_frame0(t):
    return t[:, :, 0]


def _patch_frame1(t):
    return t[:, :, 1]


def map_vision_tensor(name: str, config: dict[str, Any], shape: tuple[int, ...] | None = None) -> list[TensorMapping]:
    vc = vision_config(config)
    short = name.replace(*VISION_RENAME, 1)
    parts = short.split(".")
    if short == "visual.patch_embed.proj.weight":
        # Conv3D over two frames -> two Conv2D kernels, as llama.cpp's clip expects.
        return [TensorMapping(f"{PATCH_EMBD}.weight", _patch_frame0),
                TensorMapping(f"{PATCH_EMBD}.weight.1", _patch_frame1)]
    if short == "visual.patch_embed.proj.bias":
        return [TensorMapping(f"{PATCH_EMBD}.bias")]
    if parts[:2] == ["visual", "deepstack_merger_list"]:
        layer = vc.deepstack_visual_indexes[int(parts[2])]
        kind = DEEPSTACK_PARTS.get(parts[3])
        if kind is None:
            raise ModelConfigError(f"checkpoint tensor {name!r}: unknown deepstack merger part.")
        return [TensorMapping(TENSOR_NAMES[kind].format(bid=layer) + "." + parts[4])]
    if parts[:2] == ["visual", "merger"]:
        if parts[2] in MERGER_FC:
            return [TensorMapping(TENSOR_NAMES[MODEL_TENSOR.V_MMPROJ].format(bid=MERGER_FC[parts[2]]) + "." + parts[3])]
        if parts[2] == "norm":
            return [TensorMapping(TENSOR_NAMES[MODEL_TENSOR.V_POST_NORM] + "." + parts[3])]
        raise ModelConfigError(f"checkpoint tensor {name!r}: unknown merger part.")
    tmap = _name_map(MODEL_ARCH.MMPROJ, vc.depth)
    new = tmap.get_name(short, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise ModelConfigError(f"checkpoint tensor {name!r} is not part of the Qwen3-VL vision tower.")
    return [TensorMapping(new)]


def claims_vision(name: str) -> bool:
    return name.startswith(VISION_PREFIX)


TEXT_BLOCK = re.compile(r"^model\.language_model\.layers\.(\d+)\.(.+)$")
VISION_BLOCK = re.compile(r"^model\.visual\.blocks\.(\d+)\.(.+)$")
DEEPSTACK_BLOCK = re.compile(r"^model\.visual\.deepstack_merger_list\.(\d+)\.(.+)$")


def _check_blocks(ckpt: Checkpoint, pattern: re.Pattern, n: int, key: str, what: str) -> None:
    """Blocks 0..n-1 each hold the same tensors, and no other block exists: config.json and the weights agree."""
    blocks: dict[int, set[str]] = {}
    for name in ckpt.tensors:
        m = pattern.fullmatch(name)
        if m:
            blocks.setdefault(int(m[1]), set()).add(m[2])
    found = sorted(blocks)
    config = ckpt.model_dir / "config.json"
    if found != list(range(n)):
        missing = sorted(set(range(n)) - set(found))
        extra = sorted(set(found) - set(range(n)))
        detail = (f"missing {what} {missing[:5]}{'...' if len(missing) > 5 else ''}" if missing else "") + \
                 ("; " if missing and extra else "") + (f"{what} {extra[:5]} beyond it" if extra else "")
        raise ModelConfigError(f"{config}: {key} = {n} but the weights hold {len(found)} {what}(s) ({detail}); "
                               "config.json and the safetensors disagree: use the config.json shipped with these "
                               "weights.")
    union = set().union(*blocks.values()) if blocks else set()
    for i in found:
        if blocks[i] != union:
            lacking = sorted(union - blocks[i])
            raise ModelConfigError(f"{ckpt.model_dir}: {what} {i} lacks {len(lacking)} tensor(s) the others have "
                                   f"(first: {lacking[0]!r}); the checkpoint is incomplete.")


def check_config_matches_tensors(ckpt: Checkpoint) -> None:
    """Every block config.json implies is present, none it does not know; deepstack indexes within the tower."""
    hp = text_hparams(ckpt.config)
    vc = vision_config(ckpt.config)
    _check_blocks(ckpt, TEXT_BLOCK, hp.n_layer, "text_config.num_hidden_layers", "text layer")
    _check_blocks(ckpt, VISION_BLOCK, vc.depth, "vision_config.depth", "vision block")
    indexes = list(vc.deepstack_visual_indexes)
    bad = [i for i in indexes if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vc.depth]
    if bad or len(set(indexes)) != len(indexes):
        raise ModelConfigError(f"{ckpt.model_dir / 'config.json'}: vision_config.deepstack_visual_indexes {indexes} "
                               f"must be distinct vision block numbers in 0..{vc.depth - 1} (depth {vc.depth}); "
                               "fix config.json.")
    _check_blocks(ckpt, DEEPSTACK_BLOCK, len(indexes), "len(vision_config.deepstack_visual_indexes)",
                  "deepstack merger")


def validate(ckpt: Checkpoint) -> None:
    hp = text_hparams(ckpt.config)
    check_config_matches_tensors(ckpt)
    if not hp.tied and LM_HEAD not in ckpt.tensors:
        raise ModelConfigError(
            f"{ckpt.model_dir}: config.json says tie_word_embeddings=false but no {LM_HEAD!r} tensor is stored; "
            "the checkpoint is incomplete."
        )


def check_config(config: dict[str, Any], source: str) -> None:
    TextConfig.from_dict(config, source)
    VisionConfig.from_dict(config, source)


SPEC = ArchSpec(
    name="qwen3vl",
    hf_architectures=("Qwen3VLForConditionalGeneration",),
    outputs=(
        OutputFile(
            role="text",
            gguf_arch=gguf.MODEL_ARCH_NAMES[MODEL_ARCH.QWEN3VL],
            file_name=lambda model, ftype: f"{model}-{ftype}.gguf",
            claims=claims_text,
            map_tensor=map_text_tensor,
            write_metadata=write_text_metadata,
            skip=skip_text_tensor,
            tokenizer=BpeTokenizer(TOKENIZER_PRE, lambda config: text_hparams(config).n_vocab, add_bos=False),
        ),
        OutputFile(
            role="mmproj",
            gguf_arch=gguf.MODEL_ARCH_NAMES[MODEL_ARCH.MMPROJ],
            file_name=lambda model, ftype: f"mmproj-{model}-{ftype}.gguf",
            claims=claims_vision,
            map_tensor=map_vision_tensor,
            write_metadata=write_vision_metadata,
            keep_f16_or_f32=(f"{PATCH_EMBD}.weight", f"{PATCH_EMBD}.weight.1"),
            keep_f32=(f"{TENSOR_NAMES[MODEL_TENSOR.V_ENC_EMBD_POS]}.weight",),  # resized with ggml_interpolate
        ),
    ),
    validate=validate,
    check_config=check_config,
    unsupported_relatives={
        "Qwen2_5_VLForConditionalGeneration": "Qwen2.5-VL has a different vision tower; not supported.",
        "Qwen2VLForConditionalGeneration": "Qwen2-VL has a different vision tower; not supported.",
    },
)
