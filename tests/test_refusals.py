"""Issue 22's bad inputs and faults: each is a named EdgeError that leaves the chat, the server and the files as they were."""
from __future__ import annotations

from pathlib import Path

import pytest

from edge_common.errors import EdgeError
from edge_runtime import VisionChat
from tests.conftest import make_test_image

GREEDY = {"temperature": 0.0, "max_tokens": 4}


@pytest.fixture(scope="module")
def chat(tiny_f16_dir):
    with VisionChat.from_dir(tiny_f16_dir, n_ctx=1024, encoder_cache_mb=0) as c:
        yield c


def test_attach_or_ask_while_a_stream_is_open_is_refused_at_once(chat):
    chat.reset()
    image = make_test_image(96, 64, seed=3)
    stream = chat.stream("Say something", **GREEDY)
    next(stream)  # the stream now holds the chat
    # the same thread that iterates the stream: refused before any wait
    with pytest.raises(EdgeError, match="a stream is still open"):
        chat.attach([image])
    with pytest.raises(EdgeError, match="a stream is still open"):
        chat.ask("And now?", **GREEDY)
    assert chat._attached is None  # nothing left pending by the refusals
    stream.close()
    assert len(chat.history) in (0, 2)  # the stream's own turn only
    assert chat.ask("Again?", **GREEDY) is not None  # the chat still answers


def test_attach_after_a_turn_with_an_image(chat):
    chat.reset()
    first, second = make_test_image(96, 64, seed=4), make_test_image(64, 96, seed=5)
    chat.ask("What is this?", images=[first], **GREEDY)
    thread = chat.attach([second])
    thread.join(60)
    answer = chat.ask("And this one?", **GREEDY)
    assert isinstance(answer, str) and len(chat.history) == 4
    assert chat.last_stats.images_encoded == 0 and chat.last_stats.reused_tokens > 0


@pytest.mark.parametrize("conv_id", ["abc\n", "abc\r\n", "\nabc"])
def test_conversation_ids_must_match_whole(tmp_path, conv_id):
    from edge_runtime.server.config import ServerOptions
    from edge_runtime.server.conversations import conversation_path
    from edge_runtime.server.errors import ApiError

    options = ServerOptions(tmp_path, conversation_dir=tmp_path)
    with pytest.raises(ApiError, match="1-64 letters"):
        conversation_path(options, conv_id)
    assert conversation_path(options, "abc").name == "abc.edgeconv"


def test_tool_names_and_cors_origins_must_match_whole(tmp_path):
    from edge_runtime.chat.tool_calls import ToolError, plan_tools
    from edge_runtime.server.config import ServerOptions

    with pytest.raises(ToolError, match="function.name"):
        plan_tools([{"type": "function", "function": {"name": "lookup\n", "parameters": {}}}], None, True)
    with pytest.raises(ValueError, match="--cors-origin"):
        ServerOptions(tmp_path, cors_origins=("http://localhost:3000\n",))


def test_save_into_a_directory_a_missing_folder_or_under_a_file_is_an_output_error(chat, tmp_path):
    from edge_common.errors import OutputError

    chat.reset()
    chat.ask("Hello", **GREEDY)
    history = list(chat.history)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "taken.edgeconv").mkdir()
    cases = {tmp_path: "is a directory", tmp_path / "taken.edgeconv": "is a directory",
             tmp_path / "missing" / "c.edgeconv": "does not exist", tmp_path / "a-file" / "c.edgeconv": "not a folder"}
    for target, message in cases.items():
        with pytest.raises(OutputError, match=message) as info:
            chat.save(target)
        assert str(target.parent if message != "is a directory" else target) in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "taken.edgeconv"]  # nothing half-written
    assert list((tmp_path / "taken.edgeconv").iterdir()) == []
    assert chat.history == history
    assert chat.save(tmp_path / "ok.edgeconv") > 0  # the chat still saves


@pytest.mark.parametrize("bad", [{"encoder_flops_s": 0}, {"encoder_flops_s": "fast"}, {"prefill_flops_s": -1.0},
                                 {"encoder_flops_s": float("nan")}, {"measured": "yes"}, {"encoder_flops_s": True}])
def test_a_device_cost_file_with_a_bad_rate_is_ignored_and_remeasured(tmp_path, caplog, bad):
    import json

    from edge_runtime.vision.image_budget import GUESS_CPU, cost_file, find_cost, load_cost

    entry = {"encoder_flops_s": 1.5e11, "prefill_flops_s": 2e11, "measured": True, "prefill_measured": True,
             "projector": "sig", "measured_on": "2026-01-01", **bad}
    cost_file(tmp_path).write_text(json.dumps({"model|proj|cpu": entry}))
    with caplog.at_level("WARNING"):
        cost = load_cost(tmp_path, "model|proj|cpu", gpu=False, projector="sig")
    assert (cost.encoder_flops_s, cost.prefill_flops_s) == GUESS_CPU and not cost.measured  # measured again
    assert cost.record("encoder", 1e12, 2.0)  # the first measurement is taken
    assert "device cost" in caplog.text and str(cost_file(tmp_path)) in caplog.text
    assert find_cost(tmp_path, "cpu", "sig") is None


def test_an_encoder_cache_entry_shorter_than_its_grid_is_a_miss(tiny_f16_dir, tmp_path):
    import hashlib
    import json

    from edge_runtime.vision.disk_cache import _HEADER, MAGIC, SUFFIX

    image = make_test_image(128, 96, seed=21)
    opts = dict(n_ctx=1024, encoder_cache_mb=0, encoder_cache_dir=tmp_path)
    with VisionChat.from_dir(tiny_f16_dir, **opts) as c:
        expected = c.ask("What is this?", images=[image], **GREEDY)
    (entry,) = tmp_path.rglob("*" + SUFFIX)
    data = entry.read_bytes()
    _, n = _HEADER.unpack_from(data)
    header = json.loads(data[_HEADER.size:_HEADER.size + n])
    payload = data[_HEADER.size + n:]
    payload = payload[: len(payload) // 2]  # half the floats, with a checksum and shape that agree
    header.update(shape=[len(payload) // 4], sha256=hashlib.sha256(payload).hexdigest())
    raw = json.dumps(header).encode()
    entry.write_bytes(_HEADER.pack(MAGIC, len(raw)) + raw + payload)
    with VisionChat.from_dir(tiny_f16_dir, **opts) as c:
        assert c.ask("What is this?", images=[image], **GREEDY) == expected
        assert c.last_stats.images_encoded == 1 and c.last_stats.disk_cache_hits == 0
    assert entry.stat().st_size == len(data)  # rewritten whole by the new encoding


def _retamper(path, out, edit):
    """A saved conversation whose header is edited, with the checksum recomputed (it passes that check)."""
    import hashlib
    import json

    from edge_runtime.chat.saved_conversation import _DIGEST, _PREAMBLE, MAGIC, VERSION

    data = path.read_bytes()
    _, _, n = _PREAMBLE.unpack_from(data)
    header = json.loads(data[_PREAMBLE.size:_PREAMBLE.size + n])
    kv = data[_PREAMBLE.size + n:-_DIGEST]
    edit(header)
    raw = json.dumps(header).encode()
    body = _PREAMBLE.pack(MAGIC, VERSION, len(raw)) + raw + kv
    out.write_bytes(body + hashlib.sha256(body).digest())
    return out


def _negative_image_tokens(header):
    image = next(u for u in header["units"] if isinstance(u, dict))
    image["n_tokens"] = -image["n_tokens"]


@pytest.mark.parametrize("edit, field", [
    (lambda h: h.update(n_ctx="abc"), "n_ctx"),
    (lambda h: h.update(n_ctx=-5), "n_ctx"),
    (_negative_image_tokens, "n_tokens"),
    (lambda h: h.update(created="yesterday"), "created"),
])
def test_a_saved_header_with_bad_numbers_is_refused_naming_the_field(chat, tmp_path, edit, field):
    from edge_runtime.errors import SavedConversationError

    chat.reset()
    chat.ask("Look", images=[make_test_image(96, 64, seed=8)], **GREEDY)
    chat.save(tmp_path / "good.edgeconv")
    bad = _retamper(tmp_path / "good.edgeconv", tmp_path / "bad.edgeconv", edit)
    history = list(chat.history)
    with pytest.raises(SavedConversationError, match=field):
        chat.restore(bad)
    assert chat.history == history
    chat.ask("Still there?", **GREEDY)
    assert chat.last_stats.reused_tokens > 0  # the KV cache was kept too


@pytest.mark.parametrize("detail", ["", False, 0, "LOW"])
def test_a_bad_per_image_detail_is_refused_like_generate_refuses_it(chat, detail):
    from edge_runtime.errors import OptionError

    chat.reset()
    image = make_test_image(96, 64, seed=9)
    with pytest.raises(OptionError, match="detail must be one of"):
        chat.ask("What is it?", images=[{"image": image, "detail": detail}], **GREEDY)
    with pytest.raises(OptionError, match="detail must be one of"):
        chat.generate([{"role": "user", "content": [
            {"type": "image", "image": image, "detail": detail}, {"type": "text", "text": "Hi"}]}],
            **GREEDY)
    assert chat.history == []


@pytest.mark.parametrize("name, value, message", [
    ("image_min_tokens", float("nan"), "image_min_tokens must be a whole number"),
    ("image_max_tokens", float("nan"), "image_max_tokens must be a whole number"),
    ("image_max_tokens", 99999999999, "image_max_tokens must be at most"),
    ("image_max_tokens", 2.5, "image_max_tokens must be a whole number"),
    ("image_latency_s", "3", "image_latency_s must be a positive number of seconds"),
    ("image_latency_s", float("nan"), "image_latency_s must be a positive number of seconds"),
])
def test_image_options_are_refused_at_load_naming_the_option(name, value, message):
    from edge_runtime.core.options import EngineOptions
    from edge_runtime.errors import OptionError

    with pytest.raises(OptionError, match=message):
        EngineOptions(**{name: value})


@pytest.mark.parametrize("shares", ["nan", "1,inf", "-inf,1"])
def test_tensor_split_with_nan_or_inf_is_refused_naming_the_option(tiny_f16_dir, shares):
    from click.testing import CliRunner

    from edge_runtime.cli.cli import main

    result = CliRunner().invoke(main, [str(tiny_f16_dir), "hi", "--rpc", "127.0.0.1:1", "--tensor-split", shares])
    assert result.exit_code == 2 and "--tensor-split" in result.output and "finite" in result.output


# ---------------------------------------------------------------- encoder-cache directories


@pytest.fixture
def seal(tmp_path):
    """Makes a folder read-only for this process: its mode for a normal user, a read-only bind mount
    for root (whom modes do not stop). Yields the function; undoes it afterwards."""
    import os
    import subprocess

    mounts = []

    def make(folder):
        if os.geteuid() != 0:
            folder.chmod(0o555)
            mounts.append(("chmod", folder))
            return folder
        view = folder.with_name(folder.name + "-ro")
        view.mkdir()
        bind = subprocess.run(["mount", "--bind", str(folder), str(view)], capture_output=True)
        if bind.returncode != 0:
            pytest.skip(f"root without mount rights cannot make a read-only folder: {bind.stderr.decode()}")
        mounts.append(("mount", view))
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        return view

    yield make
    for kind, place in reversed(mounts):
        if kind == "chmod":
            place.chmod(0o755)
        else:
            subprocess.run(["umount", str(place)], check=True)


def _cache_files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_encoder_cache_dir_that_is_a_file_is_refused_at_the_door(tiny_f16_dir, tmp_path, where):
    from click.testing import CliRunner

    from edge_common.errors import OutputError
    from edge_runtime.cli.cli import main as chat_main
    from edge_runtime.core.options import EngineOptions
    from edge_runtime.server.cli import main as serve_main
    from edge_runtime.server.config import ServerOptions

    (tmp_path / "blocker").write_text("not a folder")
    bad = tmp_path / "blocker" if where == "a file" else tmp_path / "blocker" / "cache"
    with pytest.raises(OutputError, match="encoder cache dir .*blocker.* is a file") as info:
        VisionChat.from_dir(tiny_f16_dir, n_ctx=256, encoder_cache_dir=bad)
    assert "--no-encoder-cache" in str(info.value)
    for make in (lambda: EngineOptions(encoder_cache_dir=str(bad)),
                 lambda: ServerOptions(tiny_f16_dir, encoder_cache_dir=bad)):
        with pytest.raises(OutputError, match="is a file"):
            make()
    for main in (chat_main, serve_main):
        args = [str(tiny_f16_dir)] + (["hi"] if main is chat_main else []) + ["--encoder-cache-dir", str(bad)]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and "blocker" in result.output and "is a file" in result.output, result.output
    assert (tmp_path / "blocker").read_text() == "not a folder"


def test_a_read_only_encoder_cache_dir_is_used_for_reading_with_one_warning(tiny_f16_dir, tmp_path, seal, caplog):
    image, other = make_test_image(128, 96, seed=31), make_test_image(96, 128, seed=32)
    warm, empty = tmp_path / "warm", tmp_path / "empty"
    empty.mkdir()
    with VisionChat.from_dir(tiny_f16_dir, n_ctx=1024, encoder_cache_mb=0, encoder_cache_dir=warm) as c:
        expected = c.ask("What is this?", images=[image], **GREEDY)
    before = _cache_files(warm)
    for folder, hits in ((seal(warm), 1), (seal(empty), 0)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="edge_runtime"):
            with VisionChat.from_dir(tiny_f16_dir, n_ctx=1024, encoder_cache_mb=0, encoder_cache_dir=folder) as c:
                assert c.ask("What is this?", images=[image], **GREEDY) == expected
                assert c.last_stats.disk_cache_hits == hits and c.last_stats.images_encoded == 1 - hits
                c.ask("And this?", images=[other], **GREEDY)  # encoded, not kept
        warnings = [r for r in caplog.records if "read-only" in r.getMessage()]
        assert len(warnings) == 1 and str(folder) in warnings[0].getMessage()
    assert _cache_files(warm) == before and _cache_files(empty) == []  # nothing written, nothing half-written


# ---------------------------------------------------------------- restores that are refused


def test_a_refused_restore_leaves_the_conversation_as_it_was(tiny_f16_dir, tmp_path):
    """Files for another flash-attention setting or chat template are refused up front, naming it; a
    file that passes that check but whose cells llama.cpp refuses ("incompatible V transposition")
    puts the cells back. After each, the same question gets the same answer from the kept KV cache
    (the history's image has no pixels left: only the cache can answer about it)."""
    from edge_runtime.errors import SavedConversationError

    image = make_test_image(128, 96, seed=41)
    opts = dict(n_ctx=1024, encoder_cache_mb=0)
    with VisionChat.from_dir(tiny_f16_dir, flash_attn=False, **opts) as c:
        c.ask("What is this?", images=[image], **GREEDY)
        c.save(tmp_path / "fa-off.edgeconv")
        other_template = c.template.source + "{# another template #}"
    with VisionChat.from_dir(tiny_f16_dir, chat_template=other_template, **opts) as c:
        c.ask("What is this?", images=[image], **GREEDY)
        c.save(tmp_path / "other-template.edgeconv")
    lying = _retamper(tmp_path / "fa-off.edgeconv", tmp_path / "lying.edgeconv",
                      lambda h: h["depends_on"].update(flash_attn="on"))
    refusals = {tmp_path / "fa-off.edgeconv": r"flash_attn: saved 'off', here 'on'",
                tmp_path / "other-template.edgeconv": "chat template differs",
                lying: "llama.cpp refused the saved KV cells"}
    with VisionChat.from_dir(tiny_f16_dir, **opts) as c:
        c.ask("What is this?", images=[image], **GREEDY)
        c.save(tmp_path / "good.edgeconv")
        c.restore(tmp_path / "good.edgeconv")
        expected = c.ask("Say more.", **GREEDY)
        c.restore(tmp_path / "good.edgeconv")
        history, n_tokens = list(c.history), c.engine.seq_state().n_tokens
        for path, message in refusals.items():
            with pytest.raises(SavedConversationError, match=message):
                c.restore(path)
            assert c.history == history and c.engine.seq_state().n_tokens == n_tokens
        assert c.ask("Say more.", **GREEDY) == expected
        assert c.last_stats.images_encoded == 0 and c.last_stats.reused_tokens > 0
    with pytest.raises(SavedConversationError, match="chat template differs"):
        VisionChat.load(tmp_path / "good.edgeconv", chat_template=other_template, **opts)


# ---------------------------------------------------------------- the converter's inputs


@pytest.fixture
def checkpoint_copy(tiny_model_dir, tmp_path):
    """The tiny checkpoint with its own config.json (the weights linked, not copied)."""
    out = tmp_path / "ckpt"
    out.mkdir()
    for f in tiny_model_dir.iterdir():
        (out / f.name).symlink_to(f) if f.name != "config.json" else (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.mark.parametrize("section, key, value", [
    ("text_config", "num_hidden_layers", "2"), ("text_config", "num_hidden_layers", -2),
    ("text_config", "num_hidden_layers", 2.5), ("text_config", "hidden_size", None),
    ("text_config", "num_attention_heads", 0), ("text_config", "rms_norm_eps", "tiny"),
    ("text_config", "vocab_size", True), ("vision_config", "depth", "4"), ("vision_config", "patch_size", 16.0),
    ("vision_config", "deepstack_visual_indexes", ["1"]),
])
@pytest.mark.parametrize("plan", [True, False])
def test_a_config_number_that_is_a_string_negative_or_float_is_refused_naming_file_and_field(
        checkpoint_copy, tmp_path, section, key, value, plan):
    import json

    from click.testing import CliRunner

    from edge_app.cli import main

    config_path = checkpoint_copy / "config.json"
    config = json.loads(config_path.read_text())
    config[section][key] = value
    config_path.write_text(json.dumps(config))
    args = [str(checkpoint_copy)] + (["--plan"] if plan else ["-o", str(tmp_path / "out"), "-q"])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert str(config_path) in result.output and f"{section}.{key}" in result.output, result.output
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_plan_with_tensor_split_but_no_rpc_workers_is_refused(checkpoint_copy):
    from click.testing import CliRunner

    from edge_app.cli import main

    result = CliRunner().invoke(main, [str(checkpoint_copy), "--plan", "--tensor-split", "1,1"])
    assert result.exit_code == 2 and "--tensor-split" in result.output and "--rpc" in result.output, result.output
    assert "KV" not in result.output  # refused before any plan is printed


# ---------------------------------------------------------------- names matched whole


def test_a_tensor_name_with_a_trailing_newline_is_no_block_and_no_expert():
    """`$` matches before a final newline: the converter's block and expert patterns are matched whole."""
    from collections import defaultdict
    from types import SimpleNamespace

    from edge_models import ModelConfigError
    from edge_models.qwen3vl.arch import TEXT_BLOCK, _check_blocks
    from edge_models.qwen3vlmoe.arch import map_text_tensor
    from edge_models.qwen3vlmoe.synthetic import MoeSyntheticSpec

    names = ["model.language_model.layers.0.mlp.up_proj.weight", "model.language_model.layers.1.mlp.up_proj.weight\n"]
    ckpt = SimpleNamespace(tensors=dict.fromkeys(names), model_dir=Path("ckpt"), config={})
    with pytest.raises(ModelConfigError, match=r"missing text layer \[1\]"):
        _check_blocks(ckpt, TEXT_BLOCK, 2, "text_config.num_hidden_layers", "text layer")

    config = MoeSyntheticSpec().make_config(defaultdict(int), 100)
    expert = "model.language_model.layers.0.mlp.experts.down_proj"
    assert map_text_tensor(expert, config)  # the real name maps
    with pytest.raises(ModelConfigError, match="not part of the Qwen3-VL language model"):
        map_text_tensor(expert + "\n", config)
