"""Qwen3-VL MoE conversion: equal to llama.cpp's own converter tensor by tensor, either expert layout.

llama.cpp's converter (conversion/qwen3vl.py + gguf-py of the llama.cpp llama-cpp-python 0.3.36
vendors) is the independent reference; it reads the hub's expert layout. Logits against
transformers are in test_parity (the MoE variants), the quantization mix in test_quant_moe.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest

from support import reference_converter as refconv
from conftest import REAL_CACHE_ROOTS
from convert import ConvertError, convert_checkpoint
from edge_models.qwen3vlmoe.synthetic import MoeSyntheticSpec
from test_bad_inputs import _ckpt_with
from test_quant_support import pair_of

# every test converts (or loads into transformers) a checkpoint built with torch
pytestmark = pytest.mark.torch

HUB = MoeSyntheticSpec(layout="hf4", dtype="f32", experts=6, experts_used=2, seed=11)  # hidden 64, expert ff 48
AMBIGUOUS = replace(HUB, moe_ff=32, seed=12)  # hidden == 2 * expert ff: gate_up_proj fits both layouts
# Keys only one side writes: llama.cpp's general.* naming and file type, and the processor's resize bounds,
# which this converter adds so the runtime resizes as transformers does.
OWN_KEYS = ("general.", "GGUF.", "clip.vision.image_min_pixels", "clip.vision.image_max_pixels")


@pytest.fixture(scope="module")
def reference_converter(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("llama-cpp-converter")
    return refconv.unpack_converter(refconv.find_sdist(REAL_CACHE_ROOTS, scratch), scratch)


def read(path: Path):
    r = gguf.GGUFReader(path)
    tensors = {t.name: (t.tensor_type, tuple(int(x) for x in t.shape), np.array(t.data)) for t in r.tensors}
    keys = {f.name: f.contents() for f in r.fields.values() if not f.name.startswith(OWN_KEYS)}
    return tensors, keys


def assert_same_files(ours: Path, theirs: Path) -> dict[str, float]:
    """Same tensor names, types, shapes and bytes, the same model keys; returns max |diff| per tensor class."""
    ot, ok = read(ours)
    rt, rk = read(theirs)
    assert sorted(ot) == sorted(rt)
    worst: dict[str, float] = {}
    for name, (typ, shape, data) in ot.items():
        assert (typ, shape) == rt[name][:2], name
        assert np.array_equal(data, rt[name][2]), name
        cls = name.split(".", 2)[-1] if name.startswith("blk.") else name
        worst[cls] = max(worst.get(cls, 0.0), float(np.abs(data.astype(np.float64) - rt[name][2]).max(initial=0)))
    assert ok == rk
    return worst


@pytest.mark.parametrize("spec, outtype", [(HUB, "f32"), (AMBIGUOUS, "f32"), (replace(HUB, dtype="bf16"), "f16")],
                         ids=["hub-f32", "hub-ambiguous-f32", "hub-bf16-to-f16"])
def test_conversion_equals_llama_cpps_converter(artifacts, reference_converter, tmp_path, spec, outtype):
    text, mmproj = pair_of(artifacts.converted(spec, outtype))
    model_dir = artifacts.model(spec)
    ref_text = refconv.convert(reference_converter, model_dir, tmp_path / "ref.gguf", outtype)
    ref_mmproj = refconv.convert(reference_converter, model_dir, tmp_path / "ref-mmproj.gguf", outtype,
                                             mmproj=True)
    worst = assert_same_files(text, ref_text)
    assert {"ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight", "ffn_gate_inp.weight"} <= set(worst)
    assert set(worst.values()) == {0.0}
    assert gguf.GGUFReader(text).get_field("general.architecture").contents() == "qwen3vlmoe"
    assert gguf.GGUFReader(text).get_field("qwen3vlmoe.expert_count").contents() == spec.experts
    assert_same_files(mmproj, ref_mmproj)


def _converted_tensors(model_dir: Path, out: Path) -> dict[str, np.ndarray]:
    convert_checkpoint(model_dir, out, "f32", progress=False)
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(pair_of(out)[0]).tensors}


@pytest.mark.parametrize("spec", [HUB, AMBIGUOUS], ids=["unambiguous", "ambiguous"])
def test_every_expert_layout_gives_the_same_file(artifacts, tmp_path, spec):
    """The hub's layout, transformers 5's, and a checkpoint transformers 5 loaded and saved again."""
    import torch
    from transformers import Qwen3VLMoeForConditionalGeneration

    hub = artifacts.model(spec)
    hf5 = artifacts.model(replace(spec, layout="hf5"))  # same seed: the same weights, stored transposed
    resaved = tmp_path / "resaved"
    Qwen3VLMoeForConditionalGeneration.from_pretrained(hf5, dtype=torch.float32).save_pretrained(resaved)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(hf5 / name, resaved / name)
    saved = json.loads((resaved / "config.json").read_text())
    assert saved["transformers_version"].startswith("5.")  # the marker transformers itself writes
    shapes = [_converted_tensors(d, tmp_path / f"out-{i}") for i, d in enumerate((hub, hf5, resaved))]
    assert sorted(shapes[0]) == sorted(shapes[1]) == sorted(shapes[2])
    for name, data in shapes[0].items():
        assert np.array_equal(data, shapes[1][name]) and np.array_equal(data, shapes[2][name]), name


def test_ambiguous_experts_without_a_marker_are_refused(artifacts, tmp_path):
    ckpt = _ckpt_with(tmp_path, artifacts.model(AMBIGUOUS), lambda c: c.pop("transformers_version"))
    with pytest.raises(ConvertError, match="fits both expert layouts.*transformers_version") as e:
        convert_checkpoint(ckpt, tmp_path / "out", "f32", progress=False)
    assert "gate_up_proj" in str(e.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unambiguous_experts_need_no_marker(artifacts, tmp_path):
    ckpt = _ckpt_with(tmp_path, artifacts.model(HUB), lambda c: c.pop("transformers_version"))
    theirs = {t.name: np.array(t.data) for t in gguf.GGUFReader(pair_of(artifacts.converted(HUB, "f32"))[0]).tensors}
    ours = _converted_tensors(ckpt, tmp_path / "out")
    assert all(np.array_equal(ours[n], theirs[n]) for n in theirs)


def test_a_marker_the_shapes_contradict_is_refused(artifacts, tmp_path):
    """Hub weights under a transformers 5 marker: down_proj's shape says hub, the marker says otherwise."""
    ckpt = _ckpt_with(tmp_path, artifacts.model(AMBIGUOUS),
                             lambda c: c.update(transformers_version="5.0.0"))
    with pytest.raises(ConvertError, match="two layouts") as e:
        convert_checkpoint(ckpt, tmp_path / "out", "f32", progress=False)
    assert "transformers_version" in str(e.value) and "layer 0" in str(e.value)


@pytest.mark.parametrize("edit, message", [
    (lambda tc: tc.update(mlp_only_layers=[1]), "mlp_only_layers"),
    (lambda tc: tc.update(num_experts_per_tok=9), "num_experts_per_tok 9"),
    (lambda tc: tc.pop("moe_intermediate_size"), "moe_intermediate_size"),
    (lambda tc: tc.update(moe_intermediate_size=40), r"experts\.\w+' has shape .* moe_intermediate_size imply"),
])
def test_configs_llama_cpp_cannot_run_are_refused(artifacts, tmp_path, edit, message):
    ckpt = _ckpt_with(tmp_path, artifacts.model(HUB), lambda c: edit(c["text_config"]))
    with pytest.raises(ConvertError, match=message):
        convert_checkpoint(ckpt, tmp_path / "out", "f16", progress=False)


def test_vision_chat_runs_the_moe_pair_as_transformers_does(artifacts, test_image):
    """VisionChat on the converted pair: transformers' greedy first token after an image question (its prompt
    as VisionChat's template renders it), and the prefill cost model counting the experts a token runs
    through, not all of them."""
    from edge_models.qwen3vlmoe.reference import Reference
    from edge_runtime import VisionChat
    from edge_runtime.core.template import template_for

    spec = replace(HUB, layout="hf5", moe_ff=32)
    out = artifacts.converted(spec, "f32")
    ref = Reference.load(artifacts.model(spec))
    question = "What is in this picture?"
    with VisionChat.from_dir(out, n_ctx=1024, image_min_tokens=8, image_max_tokens=16384) as chat:
        assert chat.engine.arch == "qwen3vlmoe"
        prompt = template_for(chat.engine).render(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}])
        answer = chat.ask(question, images=[test_image], temperature=0.0, max_tokens=1)
        assert chat.last_stats.image_tokens == 48
        flops = chat.engine.text_flops_per_token
    before, rest = prompt.split("<|vision_start|>")
    expected = int(ref.image_prompt_logits(before, test_image, rest.split("<|vision_end|>")[1]).argmax())
    assert answer == ref.tokenizer.decode([expected], skip_special_tokens=True)
    tensors = {t.name: int(np.prod(t.shape)) for t in gguf.GGUFReader(pair_of(out)[0]).tensors}
    experts = sum(n for name, n in tensors.items() if "_exps." in name)
    active = sum(tensors.values()) - experts + experts * spec.experts_used // spec.experts
    assert flops == 2.0 * (active - tensors["token_embd.weight"])


def test_experts_stream_one_expert_at_a_time(artifacts, tmp_path, monkeypatch):
    """With row blocks of one expert the file is the same: each block is sliced and transposed on its own."""
    import convert.pipeline as pipeline

    seen = []
    real = pipeline.row_blocks

    def spy(ref, transform, by_rows=False):
        for block in real(ref, transform, by_rows):
            seen.append((ref.name, block.shape[0]))
            yield block

    monkeypatch.setattr(pipeline, "ROW_BLOCK_BYTES", 1)
    monkeypatch.setattr(pipeline, "row_blocks", spy)
    ours = _converted_tensors(artifacts.model(HUB), tmp_path / "out")
    theirs = {t.name: np.array(t.data) for t in gguf.GGUFReader(pair_of(artifacts.converted(HUB, "f32"))[0]).tensors}
    assert all(np.array_equal(ours[n], theirs[n]) for n in theirs)
    gate_up = [rows for name, rows in seen if name.endswith("layers.0.mlp.experts.gate_up_proj")]
    assert set(gate_up) == {1} and len(gate_up) >= 2 * HUB.experts  # gate and up: each expert's block alone
