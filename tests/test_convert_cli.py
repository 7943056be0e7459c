"""edge-convert: outputs, manifest, metadata, and a clear exit-2 error for each bad input."""
from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from edge_app.cli import main
from edge_common.atomic import partial_path
from edge_common.gguf_write import FloatTensor, write_gguf
from edge_models.qwen3vl.synthetic import SyntheticSpec


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def ckpt(tmp_path, tiny_model_dir):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, dst)
    return dst


def test_cli_writes_pair_and_manifest(ckpt, tmp_path):
    out = tmp_path / "out"
    res = run(ckpt, "-o", out, "--quant", "bf16", "-q")
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == json.loads(res.stdout)
    for role, arch in (("text", "qwen3vl"), ("mmproj", "clip")):
        entry = manifest[role]
        path = out / entry["path"]
        assert entry["type"] == "bf16" and entry["bytes"] == path.stat().st_size and len(entry["sha256"]) == 64
        reader = gguf.GGUFReader(path)
        assert reader.fields["general.architecture"].contents() == arch
    assert manifest["source"]["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert not list(out.glob(".*partial"))
    again = run(ckpt, "-o", out, "--quant", "bf16", "-q")
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert run(ckpt, "-o", out, "--quant", "bf16", "-q", "--overwrite").exit_code == 0


def read_kv(path):
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}, reader


@pytest.mark.parametrize("layout", ["hf4", "hf5"])
def test_metadata_for_both_config_layouts(artifacts, layout):
    spec = SyntheticSpec(layout=layout, tied=layout == "hf5")
    out = artifacts.converted(spec, "f16")
    manifest = json.loads((out / "manifest.json").read_text())
    kv, reader = read_kv(out / manifest["text"]["path"])
    assert kv["qwen3vl.block_count"] == 4 and kv["qwen3vl.embedding_length"] == 64
    assert kv["qwen3vl.attention.head_count"] == 4 and kv["qwen3vl.attention.head_count_kv"] == 2
    assert kv["qwen3vl.attention.key_length"] == 16 and kv["qwen3vl.rope.freq_base"] == 5e6
    assert kv["qwen3vl.rope.dimension_sections"] == [2, 3, 3, 0] and kv["qwen3vl.n_deepstack_layers"] == 2
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert "<|vision_start|><|image_pad|><|vision_end|>" in kv["tokenizer.chat_template"]
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[tokens.index("<|im_end|>")] == gguf.TokenType.CONTROL
    assert types[tokens.index("<think>")] == gguf.TokenType.USER_DEFINED
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tokens.index("<|im_end|>")
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) == (not spec.tied)
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    vkv, vreader = read_kv(out / manifest["mmproj"]["path"])
    assert vkv["clip.projector_type"] == "qwen3vl_merger" and vkv["clip.vision.block_count"] == 3
    assert vkv["clip.vision.is_deepstack_layers"] == [True, False, True]
    assert vkv["clip.vision.image_size"] == 256 and vkv["clip.vision.spatial_merge_size"] == 2
    vnames = {t.name for t in vreader.tensors}
    assert {"v.patch_embd.weight", "v.patch_embd.weight.1", "v.position_embd.weight", "mm.0.weight", "mm.2.weight",
            "v.post_ln.weight", "v.deepstack.0.fc1.weight", "v.deepstack.2.norm.weight"} <= vnames


def expect_error(res, *needles):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    for n in needles:
        assert n in res.output, res.output


def test_error_missing_config(ckpt, tmp_path):
    (ckpt / "config.json").unlink()
    expect_error(run(ckpt, "-o", tmp_path / "o"), "config.json", "missing")


def test_error_invalid_config(ckpt, tmp_path):
    (ckpt / "config.json").write_text("{not json")
    expect_error(run(ckpt, "-o", tmp_path / "o"), "config.json", "not valid JSON")


def test_error_unsupported_architecture(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    expect_error(run(ckpt, "-o", tmp_path / "o"), "LlamaForCausalLM", "Supported: Qwen3VLForConditionalGeneration")
    cfg["architectures"] = ["Qwen3VLMoeForConditionalGeneration"]  # supported, but this config has no experts
    (ckpt / "config.json").write_text(json.dumps(cfg))
    expect_error(run(ckpt, "-o", tmp_path / "o"), "num_experts", "Qwen3-VL MoE config")


@pytest.mark.torch
def test_error_missing_shard_and_bad_index(artifacts, tmp_path):
    src = artifacts.model(SyntheticSpec(shards=2, seed=3))
    ckpt = tmp_path / "sharded"
    shutil.copytree(src, ckpt)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.language_model.layers.99.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_error(run(ckpt, "-o", tmp_path / "o"), "layers.99", "absent")
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    expect_error(run(ckpt, "-o", tmp_path / "o"), "model-00002-of-00002.safetensors", "missing")


def test_error_truncated_safetensors(ckpt, tmp_path):
    shard = ckpt / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    expect_error(run(ckpt, "-o", tmp_path / "o"), "model.safetensors", "truncated")
    shard.write_bytes(data[:5])
    expect_error(run(ckpt, "-o", tmp_path / "o"), "truncated")


def test_error_missing_tokenizer(ckpt, tmp_path):
    (ckpt / "tokenizer.json").unlink()
    out = tmp_path / "o"
    expect_error(run(ckpt, "-o", out), "tokenizer.json", "missing")
    assert not any(p.suffix == ".gguf" for p in out.glob("*")), "nothing half-written may look finished"


def test_error_unwritable_output(ckpt, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    expect_error(run(ckpt, "-o", blocker / "sub"), "not writable")


def test_interrupted_write_leaves_nothing(tmp_path):
    def blocks():
        yield np.zeros((2, 4), np.float32)
        raise KeyboardInterrupt

    target = tmp_path / "x.gguf"
    tensor = FloatTensor("t", (4, 4), gguf.GGMLQuantizationType.F32, blocks)
    with pytest.raises(KeyboardInterrupt):
        write_gguf(target, "llama", lambda w: None, [tensor], progress=False)
    assert not target.exists() and not partial_path(target).exists()
