"""Property-based refusals (issue 22): whatever Hypothesis puts into the image options, a per-image
detail, a saved conversation's header or KV bytes, an encoder-cache entry, a GGUF header or a
config.json number, the outcome is success or an EdgeError naming the file or field, never a raw
TypeError/ValueError/ZeroDivisionError; where a chat is involved it answers afterwards, and no file
is left half-written.

The properties on files a model reads (saved conversations, cache entries, GGUF headers) share one
tiny model loaded once per module. The examples tried per surface and their seconds are printed at
the end of the module (the CI log shows them); the whole module takes about half a minute.
"""
from __future__ import annotations

import json
import struct
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.chat.saved_conversation import (
    SavedConversation,
    StateFingerprint,
    image_unit,
    read_conversation,
    text_units,
    write_conversation,
)
from edge_common.errors import EdgeError
from edge_runtime import VisionChat
from edge_runtime.core.options import EngineOptions
from edge_runtime.errors import OptionError, SavedConversationError
from edge_runtime.vision.image_budget import DETAILS, check_detail
from tests.conftest import make_test_image
from tests.test_refusals import _retamper

TRIED: Counter[str] = Counter()
SECONDS: defaultdict[str, float] = defaultdict(float)


@contextmanager
def surface(name: str):
    """Counts one example of `name` and its time, for the table printed at the end of the module."""
    start = time.perf_counter()
    try:
        yield
    finally:
        TRIED[name] += 1
        SECONDS[name] += time.perf_counter() - start


@pytest.fixture(scope="module", autouse=True)
def report_examples(request):
    start = time.perf_counter()
    yield
    write = request.config.pluginmanager.get_plugin("terminalreporter").write_line
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        _write_table(write, start)


def _write_table(write, start):
    write(f"\nfuzz: {sum(TRIED.values())} examples over {len(TRIED)} surfaces in "
          f"{time.perf_counter() - start:.1f} s (fixtures included)")
    for name in sorted(TRIED):
        write(f"fuzz:   {name:32s} {TRIED[name]:4d} examples {SECONDS[name]:6.1f} s")

# What a user or a tampered file may hold where a number belongs.
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(min_tokens=ANY_VALUE, max_tokens=ANY_VALUE, latency=ANY_VALUE)
def test_image_options_are_accepted_or_refused_by_name(min_tokens, max_tokens, latency):
    with surface("EngineOptions image options"):
        _image_options(min_tokens, max_tokens, latency)


def _image_options(min_tokens, max_tokens, latency):
    try:
        opts = EngineOptions(image_min_tokens=min_tokens, image_max_tokens=max_tokens, image_latency_s=latency)
    except OptionError as exc:
        assert any(name in str(exc) for name in ("image_min_tokens", "image_max_tokens", "image_latency_s"))
    else:
        assert opts.image_latency_s > 0


@FUZZ
@given(detail=ANY_VALUE)
def test_a_detail_is_a_known_level_or_an_option_error(detail):
    with surface("image detail"):
        try:
            assert check_detail(detail) in DETAILS
        except OptionError as exc:
            assert "detail must be one of" in str(exc)


@pytest.fixture(scope="module")
def saved_file(tmp_path_factory):
    fingerprint = StateFingerprint("a" * 64, "b" * 64, "qwen3vl", "f16", "f16", None, None, 1, "on", "c" * 64)
    units = text_units([1, 2, 3]) + [image_unit("c" * 64, 4, 2)] + text_units([5])
    conv = SavedConversation(fingerprint, units, [{"role": "user", "content": "hi"}], bytearray(b"kv" * 8),
                             n_ctx=512)
    path = tmp_path_factory.mktemp("fuzz") / "conv.edgeconv"
    write_conversation(path, conv)
    return path


@FUZZ
@given(field=st.sampled_from(["n_ctx", "created", "kv_bytes", "units.n_tokens", "units.n_pos", "units.token"]),
       value=ANY_VALUE)
def test_a_tampered_header_number_is_read_or_refused(saved_file, tmp_path_factory, field, value):
    def edit(header):
        if field == "units.token":
            header["units"][0][0] = value
        elif field.startswith("units."):
            header["units"][1][field.split(".")[1]] = value
        else:
            header[field] = value

    with surface("saved header numbers"):
        out = _retamper(saved_file, tmp_path_factory.mktemp("t") / "bad.edgeconv", edit)
        _read_or_refuse(out)


def _read_or_refuse(path):
    try:
        conv = read_conversation(path)
    except SavedConversationError:
        return None
    assert conv.n_tokens >= 0 and conv.n_ctx >= 0  # an empty conversation may be saved
    assert conv.system_prompt is None or isinstance(conv.system_prompt, str)
    json.dumps(conv.messages)
    return conv


# JSON of any shape, where a tampered header may hold it
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 64), max_value=1 << 64) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
HEADER_FIELDS = ["format", "version", "created", "model_files", "n_ctx", "n_tokens", "system_prompt", "messages",
                 "units", "kv_bytes", "depends_on"] + [f"depends_on.{f}" for f in (
                     "model_sha256", "mmproj_sha256", "arch", "kv_type_k", "kv_type_v", "image_min_tokens",
                     "image_max_tokens", "kv_streams", "flash_attn", "chat_template")]


def _set_field(header, field, value):
    if field.startswith("depends_on."):
        header["depends_on"][field.split(".", 1)[1]] = value
    else:
        header[field] = value


@FUZZ
@given(field=st.sampled_from(HEADER_FIELDS), value=ANY_JSON)
def test_any_header_field_of_any_shape_is_read_or_refused(saved_file, tmp_path_factory, field, value):
    with surface("saved header, any field"):
        out = _retamper(saved_file, tmp_path_factory.mktemp("t") / "bad.edgeconv",
                        lambda h: _set_field(h, field, value))
        _read_or_refuse(out)


# ---------------------------------------------------------------- with a model: restores, cache entries, GGUFs

GREEDY = {"temperature": 0.0, "max_tokens": 2}
LIVE = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def live(tiny_f16_dir, tmp_path_factory):
    """One chat with a disk encoder cache and no memory cache (every image is read from disk), its
    conversation about an image saved, and what it answers next."""
    root = tmp_path_factory.mktemp("live")
    image = make_test_image(128, 96, seed=51)
    with VisionChat.from_dir(tiny_f16_dir, n_ctx=1024, encoder_cache_mb=0, encoder_cache_dir=root / "cache") as chat:
        chat.ask("What is this?", images=[image], **GREEDY)
        chat.save(root / "good.edgeconv")
        chat.restore(root / "good.edgeconv")
        follow_up = chat.ask("More?", **GREEDY)
        (entry,) = (root / "cache").rglob("*.emb")
        yield {"chat": chat, "root": root, "image": image, "follow_up": follow_up, "entry": entry,
               "entry_bytes": entry.read_bytes(), "model_dir": tiny_f16_dir}


def _no_partials(root):
    return not [p for p in Path(root).rglob("*") if p.name.endswith(".partial")]


KV_EDITS = st.one_of(
    st.tuples(st.just("flip"), st.integers(min_value=0), st.integers(min_value=1, max_value=255)),
    st.tuples(st.just("cut"), st.integers(min_value=0), st.just(0)),
)


@LIVE
@given(edit=st.one_of(st.tuples(st.sampled_from(HEADER_FIELDS), ANY_JSON), KV_EDITS))
def test_a_tampered_saved_file_restores_or_is_refused_and_the_chat_answers_on(live, edit):
    """Header fields of any shape and damaged KV bytes, all with a valid checksum: a restore either
    takes the file or is refused leaving the conversation as it was; then the chat answers."""
    chat, root = live["chat"], live["root"]
    with surface("VisionChat.restore, tampered"):
        chat.restore(root / "good.edgeconv")
        history, n_tokens = list(chat.history), chat.engine.seq_state().n_tokens

        def tamper(header):
            if edit[0] in ("flip", "cut"):
                return
            _set_field(header, *edit)

        bad = _retamper(root / "good.edgeconv", root / "bad.edgeconv", tamper)
        if edit[0] in ("flip", "cut"):
            _edit_kv(bad, *edit)
        try:
            chat.restore(bad)
        except SavedConversationError:
            assert chat.history == history and chat.engine.seq_state().n_tokens == n_tokens
            assert chat.ask("More?", **GREEDY) == live["follow_up"]
        else:
            assert isinstance(chat.ask("More?", **GREEDY), str)
        assert _no_partials(root)


def _edit_kv(path, kind, where, value):
    """Flip a byte of the KV bytes, or cut them short (the header and checksum follow)."""
    import hashlib

    from edge_runtime.chat.saved_conversation import _DIGEST, _PREAMBLE, MAGIC, VERSION

    data = path.read_bytes()
    _, _, n = _PREAMBLE.unpack_from(data)
    header = json.loads(data[_PREAMBLE.size:_PREAMBLE.size + n])
    kv = bytearray(data[_PREAMBLE.size + n:-_DIGEST])
    if kind == "flip":
        kv[where % len(kv)] ^= value
    else:
        kv = kv[:where % len(kv)]
        header["kv_bytes"] = len(kv)
    raw = json.dumps(header).encode()
    body = _PREAMBLE.pack(MAGIC, VERSION, len(raw)) + raw + bytes(kv)
    path.write_bytes(body + hashlib.sha256(body).digest())


ENTRY_EDITS = st.one_of(
    st.tuples(st.just("cut"), st.integers(min_value=0), st.just(None)),
    st.tuples(st.just("flip"), st.integers(min_value=0), st.integers(min_value=1, max_value=255)),
    st.tuples(st.just("field"), st.sampled_from(["key", "projector", "shape", "sha256", "extra"]), ANY_JSON),
    st.tuples(st.just("short"), st.integers(min_value=1, max_value=8), st.just(None)),
)


@LIVE
@given(edit=ENTRY_EDITS)
def test_a_damaged_encoder_cache_entry_is_a_miss_and_rewritten_whole(live, edit):
    """A cut, flipped, re-labelled or shortened entry (the last two with a checksum that agrees) never
    fails the question: the same answer comes, from the entry if it still holds, else a new encoding,
    which rewrites the entry whole."""
    import hashlib

    from edge_runtime.vision.disk_cache import _HEADER, MAGIC

    chat, entry = live["chat"], live["entry"]
    with surface("encoder-cache entry"):
        data = bytearray(live["entry_bytes"])
        kind, where, value = edit
        _, n = _HEADER.unpack_from(data)
        header, payload = json.loads(data[_HEADER.size:_HEADER.size + n]), data[_HEADER.size + n:]
        if kind == "cut":
            data = data[:where % len(data)]
        elif kind == "flip":
            data[where % len(data)] ^= value
        else:
            if kind == "field":
                header[where] = value
            else:  # fewer floats, with a shape and a checksum that agree with them
                payload = payload[:max(4, len(payload) // (where + 1)) // 4 * 4]
                header.update(shape=[len(payload) // 4], sha256=hashlib.sha256(payload).hexdigest())
            raw = json.dumps(header).encode()
            data = _HEADER.pack(MAGIC, len(raw)) + raw + payload
        entry.write_bytes(bytes(data))
        chat.reset()
        chat.ask("What is this?", images=[live["image"]], **GREEDY)
        stats = chat.last_stats
        assert stats.images_encoded + stats.disk_cache_hits == 1
        assert chat.engine.encoder.disk.get(chat.history[0]["content"][0]["image"].digest) is not None
        assert _no_partials(live["root"])


GGUF_EDITS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(min_value=0, max_value=0.999)),
    st.tuples(st.just("magic"), st.binary(min_size=4, max_size=4).filter(lambda b: b != b"GGUF")),
    st.tuples(st.just("version"), st.integers(min_value=0, max_value=(1 << 32) - 1).filter(lambda v: v not in (2, 3))),
    st.tuples(st.just("tensor count"), st.integers(min_value=0, max_value=(1 << 64) - 1)),
    st.tuples(st.just("kv count"), st.integers(min_value=0, max_value=(1 << 64) - 1)),
)
_GGUF_FIELDS = {"magic": (0, "4s"), "version": (4, "<I"), "tensor count": (8, "<Q"), "kv count": (16, "<Q")}


@LIVE
@given(role=st.sampled_from(["text", "mmproj"]), edit=GGUF_EDITS)
def test_a_damaged_gguf_header_is_an_edge_error_naming_the_file(live, tmp_path_factory, role, edit):
    """A GGUF cut short, or with a bad magic, version, tensor or key count: loading it is an
    EdgeError naming the file; the chat already open answers as before; nothing is written."""
    import shutil

    from edge_runtime.core.engine import Engine

    with surface("GGUF header, load"):
        folder = tmp_path_factory.mktemp("gguf")
        for f in Path(live["model_dir"]).glob("*.gguf"):
            shutil.copy(f, folder / f.name)
        target = next(f for f in folder.glob("*.gguf") if f.name.startswith("mmproj") == (role == "mmproj"))
        text = next(f for f in folder.glob("*.gguf") if not f.name.startswith("mmproj"))
        mmproj = next(f for f in folder.glob("mmproj*.gguf"))
        data = bytearray(target.read_bytes())
        kind, value = edit
        if kind == "truncate":
            data = data[:int(len(data) * value)]
        else:
            offset, fmt = _GGUF_FIELDS[kind]
            struct.pack_into(fmt, data, offset, value)
            if kind == "tensor count" and value == struct.unpack_from("<Q", target.read_bytes(), 8)[0]:
                return  # the count it already had: nothing is damaged
            if kind == "kv count" and value == struct.unpack_from("<Q", target.read_bytes(), 16)[0]:
                return
        target.write_bytes(bytes(data))
        listing = sorted(p.name for p in folder.iterdir())
        with pytest.raises(EdgeError) as info:
            Engine(text, mmproj, EngineOptions(n_ctx=256)).close()
        assert str(target) in str(info.value)
        assert sorted(p.name for p in folder.iterdir()) == listing
        chat = live["chat"]
        chat.restore(live["root"] / "good.edgeconv")
        assert chat.ask("More?", **GREEDY) == live["follow_up"]


# ---------------------------------------------------------------- GGUF key/value bytes (tokenizer arrays, lengths)

def _gguf_parts(path):
    """(key, [(offset, array)]) for every key/value of a GGUF, as gguf-py's reader lays them out:
    key length, key, type, then the value (for an array: element type, count, elements)."""
    import gguf

    out = []
    for field in gguf.GGUFReader(str(path)).fields.values():
        off, parts = field.offset, []
        for p in field.parts:
            parts.append((off, p))
            off += p.nbytes
        out.append((field.name, parts))
    return out


GGUF_KV_EDITS = st.one_of(
    # random bytes inside one tokenizer array, or anywhere in the key/value section
    st.tuples(st.sampled_from(["tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "kv"]),
              st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
                       min_size=1, max_size=8)),
    # one token's text written over another of the same length: a repeated token
    st.tuples(st.just("repeat token"), st.integers(min_value=0)),
    # a string length or array count (any u64 of the section) set to a huge number
    st.tuples(st.just("length"), st.integers(min_value=0), st.integers(min_value=1 << 20, max_value=(1 << 64) - 1)),
)


def _damage_kv(data: bytearray, parts, edit) -> None:
    import numpy as np

    kind = edit[0]
    if kind == "repeat token":
        (tokens,) = [p for k, p in parts if k == "tokenizer.ggml.tokens"]
        words = [(o, bytes(p)) for o, p in tokens[6::2]]
        pairs = [(a, b) for a, b in zip(words, words[1:] + words[:1]) if len(a[1]) == len(b[1]) and a[1] != b[1]]
        pairs = pairs or [(a, b) for a in words for b in words if len(a[1]) == len(b[1]) and a[1] != b[1]]
        (_, word), (at, _) = pairs[edit[1] % len(pairs)]
        data[at:at + len(word)] = word
    elif kind == "length":
        lengths = [o for _, ps in parts for o, p in ps if p.dtype == np.uint64]
        struct.pack_into("<Q", data, lengths[edit[1] % len(lengths)], edit[2])
    else:
        spans = [(ps[0][0], ps[-1][0] + ps[-1][1].nbytes) for k, ps in parts if kind in (k, "kv")]
        lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
        for where, value in edit[1]:
            data[lo + where % (hi - lo)] = value


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(role=st.sampled_from(["text", "mmproj"]), edit=GGUF_KV_EDITS)
def test_damaged_gguf_key_values_load_or_are_refused_never_abort(live, tmp_path_factory, role, edit):
    """Random bytes in the tokenizer arrays and the key/value section, a repeated token, a length no
    file could hold: the load, in this very process, either works (the vocab tokenizes and renders
    every token) or is an EdgeError naming the file. llama.cpp alone aborts on a repeated token
    (GGML_ASSERT in llama_vocab's load): edge_llama's check of the file comes first."""
    from edge_llama.objects import Model
    from edge_llama.projector import Projector

    if role == "mmproj" and edit[0] in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                        "tokenizer.ggml.merges", "repeat token"):
        edit = ("kv",) + edit[1:] if edit[0] != "repeat token" else ("length", edit[1], 1 << 40)
    with surface("GGUF key/values, load"):
        folder = Path(live["model_dir"])
        text = next(f for f in folder.glob("*.gguf") if not f.name.startswith("mmproj"))
        source = next(folder.glob("mmproj*.gguf")) if role == "mmproj" else text
        target = tmp_path_factory.mktemp("gguf") / source.name
        data = bytearray(source.read_bytes())
        _damage_kv(data, _gguf_parts(source), edit)
        target.write_bytes(bytes(data))
        try:
            if role == "text":
                with Model(target) as model:
                    assert model.tokenize("hello\nworld") is not None
                    assert all(isinstance(model.piece(t), bytes) for t in range(model.n_vocab))
            else:
                with Model(text) as model, Projector(target, model):
                    pass
        except EdgeError as e:
            assert str(target) in str(e)


def test_a_repeated_token_is_refused_where_llama_cpp_alone_aborts(live, tmp_path_factory):
    """The case found by hand: the load runs in a child process, so the old code's abort (SIGABRT
    from GGML_ASSERT) fails this test instead of killing the suite."""
    import subprocess
    import sys

    folder = Path(live["model_dir"])
    text = next(f for f in folder.glob("*.gguf") if not f.name.startswith("mmproj"))
    target = tmp_path_factory.mktemp("gguf") / text.name
    data = bytearray(text.read_bytes())
    _damage_kv(data, _gguf_parts(text), ("repeat token", 0))
    target.write_bytes(bytes(data))
    code = ("import sys\nfrom edge_common.errors import EdgeError\nfrom edge_llama.objects import Model\n"
            "try:\n    Model(sys.argv[1]).close()\nexcept EdgeError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert str(target) in done.stdout and "tokenizer.ggml.tokens" in done.stdout and "twice" in done.stdout


# ---------------------------------------------------------------- config.json numbers

CONFIG_NUMBERS = [("text_config", k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                               "num_attention_heads", "num_key_value_heads", "head_dim",
                                               "vocab_size", "rms_norm_eps", "max_position_embeddings")] + \
                 [("vision_config", k) for k in ("depth", "hidden_size", "intermediate_size", "num_heads",
                                                 "patch_size", "out_hidden_size", "spatial_merge_size",
                                                 "num_position_embeddings", "deepstack_visual_indexes")]


@FUZZ
@given(where=st.sampled_from(CONFIG_NUMBERS), value=ANY_VALUE)
def test_a_config_number_of_any_type_is_taken_or_refused_naming_file_and_field(where, value):
    from edge_models import ModelConfigError, lookup
    from edge_models.qwen3vl.synthetic import SyntheticSpec, make_config

    with surface("config.json numbers"):
        config = make_config(SyntheticSpec(), defaultdict(int), 100)
        config[where[0]][where[1]] = value
        try:
            spec = lookup(config, "/ckpt/config.json")
        except ModelConfigError as exc:
            assert "/ckpt/config.json" in str(exc)
        else:
            assert spec.name == "qwen3vl"
