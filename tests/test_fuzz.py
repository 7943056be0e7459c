"""Property-based refusals (issue 22): whatever Hypothesis puts into the image options, a per-image
detail or the numbers of a saved conversation's header, the outcome is success or an EdgeError,
never a raw TypeError/ValueError/ZeroDivisionError. Pure Python: no model is loaded, so it runs in CI."""
from __future__ import annotations

import json

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
from edge_runtime.core.options import EngineOptions
from edge_runtime.errors import OptionError, SavedConversationError
from edge_runtime.vision.image_budget import DETAILS, check_detail
from tests.test_refusals import _retamper

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
    try:
        opts = EngineOptions(image_min_tokens=min_tokens, image_max_tokens=max_tokens, image_latency_s=latency)
    except OptionError as exc:
        assert any(name in str(exc) for name in ("image_min_tokens", "image_max_tokens", "image_latency_s"))
    else:
        assert opts.image_latency_s > 0


@FUZZ
@given(detail=ANY_VALUE)
def test_a_detail_is_a_known_level_or_an_option_error(detail):
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

    out = _retamper(saved_file, tmp_path_factory.mktemp("t") / "bad.edgeconv", edit)
    try:
        conv = read_conversation(out)
    except SavedConversationError:
        return
    assert conv.n_tokens >= 1 and conv.n_ctx >= 0
    json.dumps(conv.messages)
