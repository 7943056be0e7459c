"""The converter's Qwen3-VL rules on fake tensors of a few floats, without torch or transformers.

In the style of Ollama's convert/convert_qwen3vl_test.go: a hand-made checkpoint (numpy
arrays in a safetensors file, a config.json, a two-merge BPE tokenizer) goes through
`convert_checkpoint`, and the GGUF files it writes are read back with gguf-py's reader and
compared with fixed tables. The tables are written
out by hand from llama.cpp as vendored in the llama-cpp-python 0.3.36 sdist
(vendor/llama.cpp): `conversion/qwen3vl.py` (Qwen3VLVisionModel: the Conv3D split,
merger fc1/fc2 -> mm.0/mm.2, deepstack list index -> absolute block, image_size =
sqrt(num_position_embeddings) * patch_size; Qwen3VLTextModel: n_deepstack_layers),
`conversion/base.py` (TextModel/MmprojModel.set_gguf_parameters: the keys, mrope
sections padded to 4), and gguf-py's `constants.py` / `tensor_mapping.py` (the
GGUF names and key strings). Nothing here asks the code under test what to expect.
The transformers parity tests (test_parity.py) stay the proof on real weights.

These tests import no torch: `test_this_module_runs_with_torch_and_transformers_blocked`
runs them again in a fresh interpreter where importing torch, transformers or safetensors
raises (what a runtime-only install, the arm64 lane, has).
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGMLQuantizationType as T

from convert import convert_checkpoint

HERE = Path(__file__).resolve()
CONFIG_2B = HERE.parent / "data" / "qwen3-vl-2b-instruct.config.json"  # the hub's config.json

# --- the fake checkpoint: two text layers, a two-block vision tower, deepstack at block 1 -----

TEXT = {"hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 8, "vocab_size": 16, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "rope_theta": 5000000.0, "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True}}
VISION = {"depth": 2, "hidden_size": 4, "intermediate_size": 6, "num_heads": 2, "patch_size": 2,
          "out_hidden_size": 8, "spatial_merge_size": 2, "num_position_embeddings": 4, "temporal_patch_size": 2,
          "in_channels": 3, "deepstack_visual_indexes": [1]}
CONFIG = {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
          "tie_word_embeddings": False, "text_config": TEXT, "vision_config": VISION}
PREPROCESSOR = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 0.75],
                "size": {"shortest_edge": 4096, "longest_edge": 65536}}
# A BPE vocabulary of 6 ids (the model's 16 rows: ids 6..15 become padding).
TOKENIZER = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "c": 3}, "merges": ["a b"]},
             "added_tokens": [{"id": 4, "content": "<|im_end|>", "special": True},
                              {"id": 5, "content": "<tool_call>", "special": False}]}
TOKENIZER_CONFIG = {"eos_token": "<|im_end|>", "add_bos_token": False}

# HF name -> shape (PyTorch order) of every tensor in the fake checkpoint.
HF_SHAPES = {
    "model.language_model.embed_tokens.weight": (16, 8),
    "model.language_model.norm.weight": (8,),
    "lm_head.weight": (16, 8),
    **{f"model.language_model.layers.{i}.{k}": s for i in range(2) for k, s in {
        "input_layernorm.weight": (8,), "post_attention_layernorm.weight": (8,),
        "self_attn.q_proj.weight": (16, 8), "self_attn.k_proj.weight": (8, 8), "self_attn.v_proj.weight": (8, 8),
        "self_attn.o_proj.weight": (8, 16), "self_attn.q_norm.weight": (8,), "self_attn.k_norm.weight": (8,),
        "mlp.gate_proj.weight": (12, 8), "mlp.up_proj.weight": (12, 8), "mlp.down_proj.weight": (8, 12)}.items()},
    "model.visual.patch_embed.proj.weight": (4, 3, 2, 2, 2),  # Conv3D: out, in, time, h, w
    "model.visual.patch_embed.proj.bias": (4,),
    "model.visual.pos_embed.weight": (4, 4),
    **{f"model.visual.blocks.{i}.{k}": s for i in range(2) for k, s in {
        "norm1.weight": (4,), "norm1.bias": (4,), "norm2.weight": (4,), "norm2.bias": (4,),
        "attn.qkv.weight": (12, 4), "attn.qkv.bias": (12,), "attn.proj.weight": (4, 4), "attn.proj.bias": (4,),
        "mlp.linear_fc1.weight": (6, 4), "mlp.linear_fc1.bias": (6,),
        "mlp.linear_fc2.weight": (4, 6), "mlp.linear_fc2.bias": (4,)}.items()},
    "model.visual.merger.norm.weight": (4,), "model.visual.merger.norm.bias": (4,),
    "model.visual.merger.linear_fc1.weight": (16, 16), "model.visual.merger.linear_fc1.bias": (16,),
    "model.visual.merger.linear_fc2.weight": (8, 16), "model.visual.merger.linear_fc2.bias": (8,),
    "model.visual.deepstack_merger_list.0.norm.weight": (16,),
    "model.visual.deepstack_merger_list.0.norm.bias": (16,),
    "model.visual.deepstack_merger_list.0.linear_fc1.weight": (16, 16),
    "model.visual.deepstack_merger_list.0.linear_fc1.bias": (16,),
    "model.visual.deepstack_merger_list.0.linear_fc2.weight": (8, 16),
    "model.visual.deepstack_merger_list.0.linear_fc2.bias": (8,),
}

# --- the expected tables (llama.cpp conversion/qwen3vl.py + gguf-py constants/tensor_mapping) ---

TEXT_NAMES = {
    "model.language_model.embed_tokens.weight": "token_embd.weight",
    "model.language_model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    **{f"model.language_model.layers.{i}.{k}": f"blk.{i}.{v}" for i in range(2) for k, v in {
        "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
        "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight"}.items()},
}
VISION_NAMES = {  # the Conv3D weight is checked on its own below
    "model.visual.patch_embed.proj.bias": "v.patch_embd.bias",
    "model.visual.pos_embed.weight": "v.position_embd.weight",
    **{f"model.visual.blocks.{i}.{k}.{p}": f"v.blk.{i}.{v}.{p}" for i in range(2) for p in ("weight", "bias")
       for k, v in {"norm1": "ln1", "norm2": "ln2", "attn.qkv": "attn_qkv", "attn.proj": "attn_out",
                    "mlp.linear_fc1": "ffn_up", "mlp.linear_fc2": "ffn_down"}.items()},
    **{f"model.visual.merger.{k}.{p}": f"{v}.{p}" for p in ("weight", "bias")
       for k, v in {"norm": "v.post_ln", "linear_fc1": "mm.0", "linear_fc2": "mm.2"}.items()},
    # deepstack_merger_list.0 is the merger of block deepstack_visual_indexes[0] = 1
    **{f"model.visual.deepstack_merger_list.0.{k}.{p}": f"v.deepstack.1.{v}.{p}" for p in ("weight", "bias")
       for k, v in {"norm": "norm", "linear_fc1": "fc1", "linear_fc2": "fc2"}.items()},
}

TEXT_KV = {
    "general.architecture": "qwen3vl",
    "qwen3vl.block_count": 2,
    "qwen3vl.context_length": 256,
    "qwen3vl.embedding_length": 8,
    "qwen3vl.feed_forward_length": 12,
    "qwen3vl.attention.head_count": 2,
    "qwen3vl.attention.head_count_kv": 1,
    "qwen3vl.attention.key_length": 8,
    "qwen3vl.attention.value_length": 8,
    "qwen3vl.attention.layer_norm_rms_epsilon": pytest.approx(1e-6),
    "qwen3vl.rope.freq_base": 5000000.0,
    "qwen3vl.rope.dimension_sections": [2, 1, 1, 0],  # mrope_section padded to 4
    "qwen3vl.n_deepstack_layers": 1,  # len(deepstack_visual_indexes)
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.pre": "qwen2",
    "tokenizer.ggml.tokens": ["a", "b", "ab", "c", "<|im_end|>", "<tool_call>"] + [f"[PAD{i}]" for i in range(6, 16)],
    "tokenizer.ggml.token_type": [1, 1, 1, 1, 3, 4] + [5] * 10,  # NORMAL, CONTROL, USER_DEFINED, UNUSED
    "tokenizer.ggml.merges": ["a b"],
    "tokenizer.ggml.eos_token_id": 4,
}
MMPROJ_KV = {
    "general.architecture": "clip",
    "general.type": "mmproj",
    "clip.has_vision_encoder": True,
    "clip.projector_type": "qwen3vl_merger",
    "clip.vision.projection_dim": 8,
    "clip.vision.image_size": 4,  # sqrt(4 positions) * patch 2
    "clip.vision.patch_size": 2,
    "clip.vision.embedding_length": 4,
    "clip.vision.feed_forward_length": 6,
    "clip.vision.block_count": 2,
    "clip.vision.attention.head_count": 2,
    "clip.vision.attention.layer_norm_epsilon": pytest.approx(1e-6),
    "clip.vision.image_mean": [0.5, 0.5, 0.5],
    "clip.vision.image_std": [0.25, 0.5, 0.75],
    "clip.use_gelu": True,
    "clip.vision.spatial_merge_size": 2,
    "clip.vision.is_deepstack_layers": [False, True],
    "clip.vision.image_min_pixels": 4096,  # the processor's size bounds (gguf-py Keys.ClipVision)
    "clip.vision.image_max_pixels": 65536,
}


def fake_values(shape: tuple[int, ...], start: int) -> np.ndarray:
    """start, start+1, ... in the tensor's shape: every element says where it came from."""
    return np.arange(start, start + int(np.prod(shape)), dtype=np.float32).reshape(shape)


def save_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    """float32 tensors in the safetensors layout (huggingface/safetensors README: an 8-byte
    little-endian header size, a JSON header of dtype/shape/data_offsets, then the bytes),
    written here so the test needs no package beyond numpy (a runtime-only install has none)."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        blob = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to 8 bytes
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def write_checkpoint(root: Path) -> dict[str, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    tensors, start = {}, 0
    for name, shape in HF_SHAPES.items():
        tensors[name] = fake_values(shape, start)
        start += tensors[name].size
    save_safetensors(tensors, root / "model.safetensors")
    for name, data in (("config.json", CONFIG), ("preprocessor_config.json", PREPROCESSOR),
                       ("tokenizer.json", TOKENIZER), ("tokenizer_config.json", TOKENIZER_CONFIG)):
        (root / name).write_text(json.dumps(data))
    return tensors


def read_gguf(path: Path) -> tuple[dict, dict]:
    """(key -> value, tensor name -> (numpy-order shape, type, float32 data)) of a GGUF file."""
    reader = GGUFReader(path)
    kv = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        kv[key] = field.contents()
    tensors = {t.name: (tuple(int(n) for n in reversed(t.shape)), t.tensor_type,
                        np.asarray(t.data, dtype=np.float32).reshape(tuple(int(n) for n in reversed(t.shape))))
               for t in reader.tensors}
    return kv, tensors


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake")
    source = write_checkpoint(root / "fake-ckpt")
    manifest = convert_checkpoint(root / "fake-ckpt", root / "out", "f32", progress=False)
    text = read_gguf(root / "out" / manifest["text"]["path"])
    mmproj = read_gguf(root / "out" / manifest["mmproj"]["path"])
    return source, text, mmproj


def assert_copied(names: dict[str, str], written: dict, source: dict[str, np.ndarray]) -> None:
    """Each HF tensor is in the GGUF under its llama.cpp name with its shape and every value, as f32."""
    for hf, gguf_name in names.items():
        shape, ttype, data = written[gguf_name]
        assert shape == HF_SHAPES[hf] and ttype == T.F32, gguf_name
        assert np.array_equal(data, source[hf]), gguf_name


def test_text_tensors_keep_their_values_under_llama_cpp_names(converted):
    source, (_, text), _ = converted
    assert sorted(text) == sorted(TEXT_NAMES.values())
    assert_copied(TEXT_NAMES, text, source)


def test_projector_tensors_keep_their_values_under_llama_cpp_names(converted):
    source, _, (_, mmproj) = converted
    assert sorted(mmproj) == sorted([*VISION_NAMES.values(), "v.patch_embd.weight", "v.patch_embd.weight.1"])
    assert_copied(VISION_NAMES, mmproj, source)


def test_conv3d_patch_embedding_splits_into_two_frames(converted):
    """[out, in, t=2, h, w] -> v.patch_embd.weight = frame 0, v.patch_embd.weight.1 = frame 1 (each [out, in, h, w])."""
    source, _, (_, mmproj) = converted
    base = int(source["model.visual.patch_embed.proj.weight"].flat[0])  # element [o, c, t, y, x] = base + 24o+8c+4t+2y+x
    frame0, frame1 = mmproj["v.patch_embd.weight"], mmproj["v.patch_embd.weight.1"]
    assert frame0[0] == frame1[0] == (4, 3, 2, 2)
    # output channel 0 written out, as Ollama's test does
    assert frame0[2][0].ravel().tolist() == [base + v for v in (0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19)]
    assert frame1[2][0].ravel().tolist() == [base + v for v in (4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23)]
    o, c, y, x = np.indices((4, 3, 2, 2))
    assert np.array_equal(frame0[2], base + 24 * o + 8 * c + 2 * y + x)
    assert np.array_equal(frame1[2], base + 24 * o + 8 * c + 4 + 2 * y + x)


def test_metadata_keys_and_values(converted):
    _, (text_kv, _), (mmproj_kv, _) = converted
    for expected, kv in ((TEXT_KV, text_kv), (MMPROJ_KV, mmproj_kv)):
        got = {k: kv.get(k, "<missing>") for k in expected}
        assert got == expected
    # the text file says nothing about the vision tower (Ollama's TextKV check)
    assert not [k for k in text_kv if k.startswith("clip.") or "vision" in k]


def test_f16_file_keeps_vectors_norms_and_positions_in_f32(tmp_path):
    """llama.cpp's convert rule: 1-D tensors (norms, biases) stay F32; the position table too
    (clip resizes it with ggml_interpolate, F32 only: Ollama's converter promotes it as well)."""
    write_checkpoint(tmp_path / "ckpt")
    manifest = convert_checkpoint(tmp_path / "ckpt", tmp_path / "out", "f16", progress=False)
    for role, names in (("text", TEXT_NAMES), ("mmproj", VISION_NAMES)):
        _, tensors = read_gguf(tmp_path / "out" / manifest[role]["path"])
        for hf, gguf_name in names.items():
            want = T.F32 if len(HF_SHAPES[hf]) == 1 or gguf_name == "v.position_embd.weight" else T.F16
            assert tensors[gguf_name][1] == want, gguf_name
    _, mmproj = read_gguf(tmp_path / "out" / manifest["mmproj"]["path"])
    assert mmproj["v.patch_embd.weight"][1] == mmproj["v.patch_embd.weight.1"][1] == T.F16


class _ConfigOnly:
    """What the metadata writers read of a checkpoint: its folder, config.json and preprocessor_config.json."""

    def __init__(self, model_dir: Path, config: dict, preprocessor: dict):
        self.model_dir, self.config, self.tensors, self._pre = model_dir, config, {}, preprocessor

    def json(self, name: str, what: str | None = None, *, required: bool = True) -> dict:
        assert name == "preprocessor_config.json"
        return self._pre


def test_real_2b_config_gives_the_keys_llama_cpp_writes(tmp_path):
    """The hub's Qwen3-VL-2B-Instruct config.json; the values as Ollama's TestQwen3VLTextAndProjectorKV
    expects them (image_size 768, deepstack blocks 5/11/17 of 24, sections [24, 20, 20, 0])."""
    from gguf import GGUFWriter

    from edge_models import lookup

    config = json.loads(CONFIG_2B.read_text())
    spec = lookup(config)
    ckpt = _ConfigOnly(tmp_path / "Qwen3-VL-2B-Instruct", config,
                       {"image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                        "size": {"shortest_edge": 65536, "longest_edge": 16777216}})
    kvs = {}
    for out in spec.outputs:
        path = tmp_path / f"{out.role}.gguf"
        writer = GGUFWriter(str(path), out.gguf_arch)
        out.write_metadata(writer, ckpt)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        kvs[out.role] = read_gguf(path)[0]
    text, mmproj = kvs["text"], kvs["mmproj"]
    assert {k: text.get(k) for k in (
        "general.architecture", "qwen3vl.block_count", "qwen3vl.context_length", "qwen3vl.embedding_length",
        "qwen3vl.feed_forward_length", "qwen3vl.attention.head_count", "qwen3vl.attention.head_count_kv",
        "qwen3vl.attention.key_length", "qwen3vl.rope.freq_base", "qwen3vl.rope.dimension_sections",
        "qwen3vl.n_deepstack_layers")} == {
        "general.architecture": "qwen3vl", "qwen3vl.block_count": 28, "qwen3vl.context_length": 262144,
        "qwen3vl.embedding_length": 2048, "qwen3vl.feed_forward_length": 6144, "qwen3vl.attention.head_count": 16,
        "qwen3vl.attention.head_count_kv": 8, "qwen3vl.attention.key_length": 128, "qwen3vl.rope.freq_base": 5e6,
        "qwen3vl.rope.dimension_sections": [24, 20, 20, 0], "qwen3vl.n_deepstack_layers": 3}
    mask = mmproj["clip.vision.is_deepstack_layers"]
    assert [i for i, on in enumerate(mask) if on] == [5, 11, 17] and len(mask) == 24
    assert {k: mmproj.get(k) for k in (
        "general.architecture", "general.type", "clip.projector_type", "clip.vision.image_size",
        "clip.vision.patch_size", "clip.vision.feed_forward_length", "clip.vision.embedding_length",
        "clip.vision.block_count", "clip.vision.attention.head_count", "clip.vision.projection_dim",
        "clip.vision.spatial_merge_size")} == {
        "general.architecture": "clip", "general.type": "mmproj", "clip.projector_type": "qwen3vl_merger",
        "clip.vision.image_size": 768, "clip.vision.patch_size": 16, "clip.vision.feed_forward_length": 4096,
        "clip.vision.embedding_length": 1024, "clip.vision.block_count": 24, "clip.vision.attention.head_count": 16,
        "clip.vision.projection_dim": 2048, "clip.vision.spatial_merge_size": 2}


def test_this_module_runs_with_torch_and_transformers_blocked():
    """A Pi-like interpreter: `import torch` / `import transformers` raise; this file's other tests
    still pass (no conftest: the shared fixtures build checkpoints with torch)."""
    code = ("import sys; sys.modules.update(dict.fromkeys(('torch', 'transformers', 'safetensors'))); import pytest; "
            f"sys.exit(pytest.main(['-q', '--noconftest', '-p', 'no:cacheprovider', {str(HERE)!r}, "
            "'-k', 'not blocked']))")
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE.parents[1], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "6 passed" in out.stdout, out.stdout[-2000:]
