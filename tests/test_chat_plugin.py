"""The seed's plugin API and the runtime demo, on the tiny converted model."""
from __future__ import annotations

import io

import pytest

from edge_runtime.cli.demo import REAL_MODEL_HOWTO, run
from edge_runtime.errors import ModelFileError
from edge_runtime.chat.plugin import MODEL_DIR_ENV, create_qwen3_vl_2b_plugin


def test_plugin_answers_about_an_image(tiny_f32_dir, test_image, tmp_path):
    path = tmp_path / "photo.png"
    test_image.save(path)
    with create_qwen3_vl_2b_plugin(tiny_f32_dir, n_ctx=1024) as plugin:
        first = plugin.generate_multimodal_response(image_path=path, prompt="What is this?", max_tokens=4, temperature=0)
        assert isinstance(first, str) and first
        assert plugin.last_stats.images_encoded == 1
        again = plugin.generate_multimodal_response(image_path=str(path), prompt="What is this?", max_tokens=4, temperature=0)
        assert again == first and plugin.last_stats.images_encoded == 0
        assert plugin.chat.history == []  # calls are independent
        text_only = plugin.generate_multimodal_response(prompt="Hello", max_tokens=2, temperature=0)
        assert plugin.last_stats.images_encoded == 0 and 1 <= plugin.last_stats.generated_tokens <= 2
        assert plugin.generate_multimodal_response(prompt="Hello", max_tokens=2, temperature=0) == text_only


def test_plugin_model_dir_from_environment(tiny_f32_dir, monkeypatch, tmp_path):
    monkeypatch.setenv(MODEL_DIR_ENV, str(tiny_f32_dir))
    with create_qwen3_vl_2b_plugin(n_ctx=256) as plugin:
        assert plugin.model_dir == tiny_f32_dir
    monkeypatch.setenv(MODEL_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(ModelFileError):
        create_qwen3_vl_2b_plugin()


def test_demo_says_the_words_are_noise_and_how_to_run_a_real_model(tiny_f16_dir):
    out = io.StringIO()
    first, follow = run(tiny_f16_dir, max_tokens=4, out=out)  # `make demo` converts to f16
    text = out.getvalue()
    assert "random weights" in text and "noise" in text and REAL_MODEL_HOWTO in text
    assert follow.reused_tokens >= first.prompt_tokens and follow.images_encoded == 0
    assert "TTFT" in text
