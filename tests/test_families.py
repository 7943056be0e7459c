"""The family registry: generic code finds a model family's facts by the architecture a file names.

Expected values come from the files themselves (the hub's Qwen3-VL-2B config.json, a converted
projector's GGUF keys read with gguf-py) and from Qwen's published processor settings.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import gguf
import pytest

import edge_models
from edge_common.manifest import resolve_model_paths
from edge_models import (ModelConfigError, chat_format, family_for_checkpoint, family_for_gguf, family_for_hf,
                         family_for_projector, lookup)
from edge_runtime.vision.vision_spec import hf_vision_spec, read_vision_spec

HUB_CONFIG = json.loads((Path(__file__).parent / "data" / "qwen3-vl-2b-instruct.config.json").read_text())


def test_lookup_by_each_architecture_name():
    family = family_for_hf(HUB_CONFIG)
    assert family.name == "qwen3vl" and lookup(HUB_CONFIG) is family.arch
    assert family_for_gguf("qwen3vl") is family and family_for_projector("qwen3vl_merger") is family
    # what a GGUF without a family we know gets: the default (first) family, as chat_format always did
    assert family_for_gguf(None) is family_for_gguf("llama") is edge_models.FAMILIES[0]
    assert chat_format("llama") is edge_models.FAMILIES[0].chat_format
    with pytest.raises(ModelConfigError, match="LlamaForCausalLM is not supported. Supported: Qwen3VL"):
        family_for_hf({"architectures": ["LlamaForCausalLM"]})


def test_family_facts_match_qwens_processor():
    """preprocessor_config.json of Qwen3-VL: patch 16, merge 2, 65536..16777216 pixels; 2 fps video, 4..768 frames."""
    v = family_for_gguf("qwen3vl").vision
    assert (v.patch_size, v.merge_size, v.factor) == (16, 2, 32)
    assert (v.min_tokens, v.max_tokens) == (65536 // 32 ** 2, 16777216 // 32 ** 2)
    assert (v.video_fps, v.video_min_frames, v.video_max_frames, v.temporal_patch_size) == (2.0, 4, 768, 2)


def test_a_sibling_registers_with_one_entry(monkeypatch):
    """A further family (here a made-up next version sharing the vision tower) is found by its names once it is
    in FAMILIES; nothing else changes."""
    dense = family_for_gguf("qwen3vl")
    nxt = replace(dense, arch=replace(dense.arch, name="qwen3vlnext",
                                      hf_architectures=("Qwen3VLNextForConditionalGeneration",)),
                  gguf_architectures=("qwen3vlnext",))
    assert family_for_gguf("qwen3vlnext") is dense  # not registered yet: the default
    monkeypatch.setattr(edge_models, "FAMILIES", edge_models.FAMILIES + (nxt,))
    assert family_for_gguf("qwen3vlnext") is nxt and family_for_gguf("qwen3vl") is dense
    assert family_for_hf({"architectures": ["Qwen3VLNextForConditionalGeneration"]}) is nxt
    assert family_for_hf(HUB_CONFIG) is dense


def test_the_moe_family_is_registered_beside_the_dense_one():
    """Qwen3-VL MoE: its own HF class and text GGUF architecture (llama.cpp's names), the dense projector."""
    moe = family_for_hf({"architectures": ["Qwen3VLMoeForConditionalGeneration"]})
    assert moe.name == "qwen3vlmoe" and family_for_gguf("qwen3vlmoe") is moe
    assert moe.gguf_architectures == ("qwen3vlmoe",)
    assert family_for_projector("qwen3vl_merger") is family_for_gguf("qwen3vl")  # the same projector type


def test_tools_load_on_demand(tiny_model_dir):
    family = family_for_checkpoint(tiny_model_dir)
    assert family is family_for_hf(HUB_CONFIG)
    assert callable(family.module("synthetic").build_checkpoint)
    with pytest.raises(ValueError, match="tool must be one of"):
        family.module("weights")
    with pytest.raises(ModelConfigError, match="config.json: unreadable"):
        family_for_checkpoint(tiny_model_dir / "nowhere")


def test_a_projector_brings_its_familys_facts(tiny_f32_dir, tiny_model_dir):
    """The runtime's VisionSpec of a converted projector: grid from its keys, the rest from its family."""
    _, mmproj = resolve_model_paths(tiny_f32_dir)
    reader = gguf.GGUFReader(str(mmproj))
    projector_type = reader.fields[gguf.Keys.Clip.PROJECTOR_TYPE].contents()
    spec = read_vision_spec(mmproj)
    assert spec.facts is family_for_projector(projector_type).vision
    assert spec.patch_size == reader.fields[gguf.Keys.ClipVision.PATCH_SIZE].contents()
    assert hf_vision_spec(tiny_model_dir).facts is spec.facts
