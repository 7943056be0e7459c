"""Random-weight Qwen3-VL checkpoints in the exact Hugging Face layout.

No machine here reaches a model hub, so tests, the demo and benchmarks build
their own: config.json (transformers 4.57 or 5 layout), safetensors shards
(optionally with an index), a small BPE tokenizer trained with `tokenizers`
that carries Qwen's special tokens, a Qwen-style chat template and
preprocessor_config.json. `tiny` builds in seconds; `2b` has the real shapes
of Qwen3-VL-2B-Instruct (meaningless words, real speed and memory).
Needs the `convert` extra (torch, transformers, tokenizers, safetensors).
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import click

from edge_common.atomic import write_json_atomic

from .reference import tensor_shapes

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
PLAIN_ADDED_TOKENS = ("<tool_call>", "</tool_call>", "<think>", "</think>")
# Qwen2's pre-tokenizer regex: llama.cpp's `qwen2` pre-tokenizer splits the same way.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and messages[0]['role'] != 'system' and system_prompt is defined %}"
    "<|im_start|>system\n{{ system_prompt }}<|im_end|>\n{%- endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string %}{{ message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' or 'image' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'video' or 'video' in part %}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in part %}{{ part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}<|im_end|>\n"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
WORDS = (
    "the a an image picture photo shows what is in this of cat dog red blue green box left right top bottom "
    "describe color shape where how many there are one two three four person car tree sky house window door "
    "small large near far text reads sign says answer question yes no it and with on under above below "
    "circle square line stripe dark light white black yellow orange purple background center corner object"
).split()


@dataclass(frozen=True)
class TextShape:
    hidden: int = 64
    ff: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    mrope_section: tuple[int, int, int] = (2, 3, 3)
    vocab_size: int | None = None  # None: the tokenizer's size rounded up to 64
    max_positions: int = 4096


@dataclass(frozen=True)
class VisionShape:
    depth: int = 3
    hidden: int = 64
    ff: int = 128
    heads: int = 4
    patch: int = 16
    merge: int = 2
    num_positions: int = 256
    deepstack: tuple[int, ...] = (0, 2)


# Shapes of Qwen3-VL-2B-Instruct (its public config.json).
TEXT_2B = TextShape(hidden=2048, ff=6144, layers=28, heads=16, kv_heads=8, head_dim=128,
                    mrope_section=(24, 20, 20), vocab_size=151936, max_positions=262144)
VISION_2B = VisionShape(depth=24, hidden=1024, ff=4096, heads=16, patch=16, merge=2,
                        num_positions=2304, deepstack=(5, 11, 17))


@dataclass(frozen=True)
class SyntheticSpec:
    size: str = "tiny"  # "tiny" | "2b"
    layout: str = "hf5"  # "hf5": rope_parameters (transformers 5); "hf4": rope_scaling + rope_theta (4.57, the hub)
    dtype: str = "bf16"  # "bf16" | "f16" | "f32"
    tied: bool = True
    shards: int = 1
    seed: int = 0
    text_layers: int | None = None  # overrides of the size's shapes
    vision_depth: int | None = None
    text: TextShape | None = None
    vision: VisionShape | None = None
    tokenizer_vocab: int = 400
    min_image_tokens: int = field(default=8)  # preprocessor min_pixels, in merged tokens

    def text_shape(self) -> TextShape:
        shape = self.text or (TEXT_2B if self.size == "2b" else TextShape())
        return replace(shape, layers=self.text_layers) if self.text_layers else shape

    def vision_shape(self) -> VisionShape:
        shape = self.vision or (VISION_2B if self.size == "2b" else VisionShape())
        if self.vision_depth:
            shape = replace(shape, depth=self.vision_depth,
                            deepstack=tuple(i for i in shape.deepstack if i < self.vision_depth))
        return shape

    # Override points of a sibling family's spec (edge_models.qwen3vlmoe.synthetic):
    def make_config(self, ids: dict[str, int], n_tokens: int) -> dict[str, Any]:
        return make_config(self, ids, n_tokens)

    def weight_shapes(self, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """Names and shapes as this transformers creates them."""
        return tensor_shapes(config)

    def stored(self, name: str, tensor):
        """A weight as the checkpoint stores it (a layout other than this transformers' own)."""
        return tensor

    def validate(self) -> None:
        if self.size not in ("tiny", "2b"):
            # a plain ValueError: test/bench checkpoint specs written in code: a programming error
            raise ValueError(f"size must be 'tiny' or '2b', got {self.size!r}")
        if self.layout not in ("hf4", "hf5"):
            # a plain ValueError: test/bench checkpoint specs written in code: a programming error
            raise ValueError(f"layout must be 'hf4' or 'hf5', got {self.layout!r}")
        if self.dtype not in ("bf16", "f16", "f32"):
            # a plain ValueError: test/bench checkpoint specs written in code: a programming error
            raise ValueError(f"dtype must be bf16, f16 or f32, got {self.dtype!r}")


def corpus(n_sentences: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        words = rng.choices(WORDS, k=rng.randint(4, 14))
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 1000)))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ":"]))
    return lines


def train_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE with Qwen2's splitting and special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    tok.train_from_iterator(corpus(seed=seed), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED_TOKENS])
    return tok


def write_tokenizer(out: Path, tok) -> dict[str, int]:
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + PLAIN_ADDED_TOKENS}
    added = {
        str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": t in SPECIAL_TOKENS}
        for t in SPECIAL_TOKENS + PLAIN_ADDED_TOKENS
    }
    write_json_atomic(out / "tokenizer_config.json", {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 262144,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
    })
    return ids


def make_config(spec: SyntheticSpec, ids: dict[str, int], n_tokens: int) -> dict[str, Any]:
    t, v = spec.text_shape(), spec.vision_shape()
    vocab = t.vocab_size or int(math.ceil(n_tokens / 64) * 64)
    rope = {"rope_type": "default", "mrope_section": list(t.mrope_section), "mrope_interleaved": True}
    text = {
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"], "head_dim": t.head_dim, "hidden_act": "silu",
        "hidden_size": t.hidden, "initializer_range": 0.02, "intermediate_size": t.ff,
        "max_position_embeddings": t.max_positions, "model_type": "qwen3_vl_text",
        "num_attention_heads": t.heads, "num_hidden_layers": t.layers, "num_key_value_heads": t.kv_heads,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": spec.tied, "use_cache": True, "vocab_size": vocab,
        "dtype": {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[spec.dtype],
    }
    if spec.layout == "hf5":
        text["rope_parameters"] = {**rope, "rope_theta": 5000000.0}
    else:
        text["rope_scaling"] = rope
        text["rope_theta"] = 5000000
    vision = {
        "deepstack_visual_indexes": list(v.deepstack), "depth": v.depth, "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": v.hidden, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": v.ff,
        "model_type": "qwen3_vl" if spec.layout == "hf4" else "qwen3_vl_vision", "num_heads": v.heads,
        "num_position_embeddings": v.num_positions, "out_hidden_size": t.hidden, "patch_size": v.patch,
        "spatial_merge_size": v.merge, "temporal_patch_size": 2,
    }
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "model_type": "qwen3_vl",
        "text_config": text,
        "vision_config": vision,
        "tie_word_embeddings": spec.tied,
        "transformers_version": "4.57.0" if spec.layout == "hf4" else "5.0.0",
    }


def preprocessor_config(spec: SyntheticSpec) -> dict[str, Any]:
    v = spec.vision_shape()
    token_px = (v.patch * v.merge) ** 2
    return {
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "patch_size": v.patch, "temporal_patch_size": 2, "merge_size": v.merge,
        "size": {"shortest_edge": spec.min_image_tokens * token_px, "longest_edge": 16384 * token_px},
        "processor_class": "Qwen3VLProcessor",
    }


def random_tensor(name: str, shape: tuple[int, ...], gen):
    """Weights whose activations keep a useful scale through every layer (logits ~ +-3)."""
    import torch

    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    if len(shape) == 1:
        return 1.0 + 0.1 * x if "norm" in name else 0.02 * x
    if "embed_tokens" in name or name == "lm_head.weight":
        return x * (3.0 / math.sqrt(shape[1]))  # logits ~ +-3 whatever the width
    if "pos_embed" in name:
        return 0.5 * x
    if name.endswith("mlp.gate.weight"):  # an MoE router: clear top-k gaps, so rounding never flips a choice
        return x * (2.0 / math.sqrt(shape[1]))
    fan_in = shape[-1] if len(shape) == 3 and "experts" in name else math.prod(shape[1:])  # [experts, out, in]
    return x * (0.5 / math.sqrt(fan_in))


def write_weights(out: Path, shapes: dict[str, tuple[int, ...]], spec: SyntheticSpec) -> None:
    import torch
    from safetensors.torch import save_file

    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[spec.dtype]
    gen = torch.Generator().manual_seed(spec.seed)
    names = sorted(shapes)
    n = max(1, spec.shards)
    groups = [names[i::n] for i in range(n)] if n > 1 else [names]
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    for fname, group in zip(files, groups):
        tensors = {k: spec.stored(k, random_tensor(k, shapes[k], gen)).to(dtype).contiguous() for k in sorted(group)}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        tmp = out / f".{fname}.partial"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.replace(out / fname)
        weight_map.update({k: fname for k in tensors})
        del tensors
    if n > 1:
        write_json_atomic(out / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def build_checkpoint(out_dir: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write a random-weight Qwen3-VL checkpoint into `out_dir` and return it."""
    spec.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(spec.tokenizer_vocab, seed=spec.seed)
    ids = write_tokenizer(out, tok)
    config = spec.make_config(ids, tok.get_vocab_size())
    write_weights(out, spec.weight_shapes(config), spec)
    write_json_atomic(out / "preprocessor_config.json", preprocessor_config(spec))
    write_json_atomic(out / "generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"], "do_sample": False,
    })
    write_json_atomic(out / "config.json", config)  # last: its presence marks a complete checkpoint
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--size", default="tiny", show_default=True, type=click.Choice(["tiny", "2b"]))
@click.option("--layout", default="hf5", show_default=True, type=click.Choice(["hf4", "hf5"]),
              help="config.json layout of transformers 4.57 (hub) or 5.")
@click.option("--dtype", default="bf16", show_default=True, type=click.Choice(["bf16", "f16", "f32"]))
@click.option("--untied", is_flag=True, help="Store a separate lm_head.")
@click.option("--shards", default=1, show_default=True, type=click.IntRange(min=1))
def main(out_dir: Path, size: str, layout: str, dtype: str, untied: bool, shards: int) -> None:
    """Build a random-weight Qwen3-VL checkpoint in OUT_DIR."""
    path = build_checkpoint(out_dir, SyntheticSpec(size=size, layout=layout, dtype=dtype, tied=not untied,
                                                   shards=shards))
    click.echo(json.dumps({"checkpoint": str(path)}))


if __name__ == "__main__":
    main()
