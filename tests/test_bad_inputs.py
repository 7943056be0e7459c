"""Issue 10's list of bad inputs that got through: each is refused with a clear error (exit code 2 in CLIs)."""
from __future__ import annotations

import math
import re

import numpy as np

import pytest
from click.testing import CliRunner

from edge_runtime import VisionChat
from edge_runtime.errors import PromptEncodingError
from edge_runtime.core.options import GenerationOptions


@pytest.fixture(scope="module")
def chat(tiny_f16_dir):
    with VisionChat.from_dir(tiny_f16_dir, n_ctx=512) as c:
        yield c


@pytest.mark.parametrize("name", ["temperature", "repeat_penalty", "top_p", "min_p", "presence_penalty",
                                  "frequency_penalty"])
def test_nan_and_infinite_sampling_settings_are_refused(name):
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            GenerationOptions(**{name: bad})


def test_nan_temperature_refused_by_visionchat_and_edge_chat(chat, tiny_f16_dir):
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        chat.ask("hi", temperature=math.nan, max_tokens=2)
    from edge_runtime.cli.cli import main

    result = CliRunner().invoke(main, [str(tiny_f16_dir), "hi", "--repeat-penalty", "nan", "--max-tokens", "2"])
    assert result.exit_code == 2 and "repeat_penalty must be a finite number" in result.output


def test_lone_surrogate_is_refused_naming_its_position(chat):
    before = list(chat.history)
    with pytest.raises(PromptEncodingError, match=r"the prompt .* \(U\+D800\) at character 4"):
        chat.ask("abc \ud800 def", max_tokens=2)
    with pytest.raises(PromptEncodingError, match=r"messages\[0\]\.content .* at character 0"):
        chat.generate([{"role": "user", "content": "\udfff"}], max_tokens=2)
    assert chat.history == before  # the refused calls left the conversation as it was
    answer = chat.ask("abc def", max_tokens=2, temperature=0)  # and the chat is still usable
    assert isinstance(answer, str) and chat.last_stats.prompt_tokens > 0
    assert len(chat.history) == len(before) + 2 and chat.history[-1] == {"role": "assistant", "content": answer}


@pytest.mark.parametrize("cli, args, message", [
    ("edge_runtime.cli.cli", ["--threads", "-4"], "--threads"),
    ("edge_runtime.server.cli", ["--threads", "-4"], "--threads"),
    ("edge_app.cli", ["--plan", "--ctx-size", "-4096"], "--ctx-size"),
    ("edge_app.cli", ["--threads", "-4"], "--threads"),
])
def test_negative_numbers_are_refused_by_the_clis(cli, args, message, tmp_path):
    import importlib

    main = importlib.import_module(cli).main
    result = CliRunner().invoke(main, [str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output and "-4" in result.output


def test_edge_chat_drops_an_image_that_failed_to_load(tiny_f16_dir, tmp_path):
    from edge_runtime.cli.cli import main

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    stdin = f"/image {bad}\nwhat is this?\nand now?\n/quit\n"
    result = CliRunner().invoke(main, [str(tiny_f16_dir), "--max-tokens", "2", "--temperature", "0"], input=stdin)
    assert result.exit_code == 0, result.output
    assert result.output.count("broken.png") >= 1 and "pending image(s) and clip(s) were dropped" in result.output
    assert result.output.count("error:") == 1  # the next question is answered


# ---------------------------------------------------------------- converter: config.json against the tensors


def _ckpt_with(tmp_path, tiny_model_dir, edit):
    import json
    import shutil

    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _convert(ckpt, out):
    from edge_app.cli import main

    return CliRunner().invoke(main, [str(ckpt), "-o", str(out), "-q"])


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["text_config"].update(num_hidden_layers=c["text_config"]["num_hidden_layers"] + 1),
     r"text_config.num_hidden_layers = 5 but the weights hold 4 text layer\(s\) \(missing text layer \[4\]\)"),
    (lambda c: c["text_config"].update(num_hidden_layers=3), r"text layer \[3\] beyond it"),
    (lambda c: c["vision_config"].update(depth=c["vision_config"]["depth"] + 2), r"vision_config.depth = \d+ but"),
    (lambda c: c["vision_config"].update(deepstack_visual_indexes=[0, 99]), r"deepstack_visual_indexes \[0, 99\]"),
    (lambda c: c["vision_config"].update(deepstack_visual_indexes=c["vision_config"]["deepstack_visual_indexes"][:1]),
     r"deepstack merger"),
])
def test_converter_refuses_a_config_that_disagrees_with_the_weights(tmp_path, tiny_model_dir, edit, message):
    out = tmp_path / "out"
    result = _convert(_ckpt_with(tmp_path, tiny_model_dir, edit), out)
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output), result.output
    assert not out.exists() or not any(out.iterdir())  # checked before anything is written


def test_converter_refuses_overlapping_tensor_bytes(tmp_path, tiny_model_dir):
    import json
    import shutil
    import struct

    from convert.checkpoint import read_safetensors_header
    from convert.errors import ConvertError

    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}).encode()
    forged = tmp_path / "forged.safetensors"
    forged.write_bytes(struct.pack("<Q", len(header)) + header + bytes(24))
    with pytest.raises(ConvertError, match=r"tensors 'a' .* and 'b' .* overlap"):
        read_safetensors_header(forged)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, ckpt)
    if not (ckpt / "model.safetensors.index.json").exists():
        shutil.copy(forged, ckpt / "zz-forged.safetensors")
        out = tmp_path / "out"
        result = _convert(ckpt, out)
        assert result.exit_code == 2 and "overlap" in result.output and not out.exists()


# ---------------------------------------------------------------- imatrix files


def _small_imatrix():
    from quant import imatrix as imx

    sums = np.arange(1, 65, dtype=np.float32).reshape(1, 64)
    return imx.Imatrix({"blk.0.attn_q.weight": imx.ImatrixEntry(sums, np.array([4])),
                        "blk.0.ffn_up.weight": imx.ImatrixEntry(sums * 2, np.array([4]))}, ("calib",), 1, 8)


@pytest.mark.parametrize("damage", ["truncated_gguf", "garbage_gguf", "legacy_bad_name", "legacy_nan", "gguf_nan"])
def test_damaged_imatrix_files_are_a_clear_quant_error(tmp_path, damage):
    import struct

    from quant import imatrix as imx
    from quant.errors import QuantError

    path = tmp_path / "im.gguf"
    im = _small_imatrix()
    if damage == "truncated_gguf":
        full = imx.save(im, path).read_bytes()
        path.write_bytes(full[: len(full) // 2])
    elif damage == "garbage_gguf":
        path.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    elif damage == "legacy_bad_name":  # an entry whose name length is negative
        path = tmp_path / "im.dat"
        path.write_bytes(struct.pack("<ii", 1, -40) + b"x" * 64)
    elif damage == "legacy_nan":
        path = tmp_path / "im.dat"
        name = b"blk.0.attn_q.weight"
        path.write_bytes(struct.pack("<ii", 1, len(name)) + name + struct.pack("<ii", 1, 2) + struct.pack("<ff", 1.0, math.nan))
    else:
        im.entries["blk.0.ffn_up.weight"].sums[0, 3] = math.inf
        imx.save(im, path)
    with pytest.raises(QuantError, match=str(path.name)) as info:
        imx.load(path)
    assert re.search(r"damaged|truncated|not an imatrix|not finite|negative", str(info.value)), info.value


# ---------------------------------------------------------------- disk space


def test_disk_space_messages_show_real_numbers(tmp_path, monkeypatch):
    """A nearly full disk (3 MB free, 5 MB needed) used to read "needs 0.01 GB free ... has 0.00 GB"."""
    import shutil
    from collections import namedtuple

    from edge_common.disk import check_free_space
    from edge_common.units import format_bytes
    from quant.errors import QuantError

    assert [format_bytes(n) for n in (512, 3_000_000, 12_400_000_000, 150e9, 1e15)] == [
        "512 B", "3.00 MB", "12.4 GB", "150 GB", "1000 TB"]
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**9, 10**9 - 3_000_000, 3_000_000))
    with pytest.raises(QuantError, match=r"needs 5.00 MB free for the text model but has 3.00 MB"):
        check_free_space(tmp_path, 5_000_000, "the text model", QuantError)


def test_negative_context_and_nan_server_settings_are_refused_in_the_api(tmp_path):
    from edge_runtime.server.config import ServerOptions
    from quant import estimate as E
    from quant.errors import QuantError

    config = tmp_path / "config.json"
    config.write_text((__import__("pathlib").Path(__file__).parent / "data" / "qwen3-vl-2b-instruct.config.json")
                      .read_text())
    with pytest.raises(QuantError, match=r"n_ctx must be a positive number of tokens, got -4096"):
        E.estimate(config, "q4_k_m", n_ctx=-4096)
    for name in ("timeout_s", "encoder_cache_mb"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            ServerOptions(model_dir=tmp_path, **{name: math.nan})
