"""The type catalog and KV-cache types: values match llama.cpp / ggml, errors list the choices."""
from __future__ import annotations

import gguf
import pytest
from gguf import GGMLQuantizationType as G

from quant import catalog, kv
from quant.errors import QuantError

ISSUE_TYPES = ("f32 f16 bf16 q8_0 q6_k q5_k_m q5_k_s q5_0 q5_1 q4_k_m q4_k_s q4_0 q4_1 iq4_nl iq4_xs q3_k_l q3_k_m "
               "q3_k_s q2_k q2_k_s iq3_xxs iq3_xs iq3_s iq3_m iq2_xxs iq2_xs iq2_s iq2_m iq1_s iq1_m tq1_0 tq2_0").split()


def test_catalog_has_every_llama_quantize_type():
    assert set(ISSUE_TYPES) <= set(catalog.names())
    assert len(set(catalog.names())) == len(catalog.names())


def test_ftype_values_match_llama_h():
    for t in catalog.TYPES:
        name = "ALL_F32" if t.name == "f32" else "MOSTLY_" + (t.alias_of or t.name).upper()
        assert gguf.LlamaFileType[name] == t.ftype, t.name


def test_bits_per_weight_come_from_ggml_blocks():
    from quant import ggml

    assert catalog.lookup("q8_0").bits_per_weight == 8.5
    assert catalog.lookup("q4_k_m").bits_per_weight == 4.5
    assert catalog.lookup("q6_k").bits_per_weight == pytest.approx(6.5625)
    for t in catalog.TYPES:
        assert t.bits_per_weight == pytest.approx(8 * ggml.type_size(t.ggml_type) / ggml.block_size(t.ggml_type))


def test_imatrix_requirements_cover_what_llama_cpp_refuses():
    must = {"iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq1_s", "iq1_m", "iq3_xxs", "iq3_xs", "q2_k_s"}
    need = {t.name for t in catalog.TYPES if t.needs_imatrix}
    assert must <= need
    assert not {"q4_k_m", "q8_0", "q6_k", "iq4_nl", "iq4_xs", "q2_k", "f16"} & need


def test_projector_types_map_to_one_ggml_type():
    assert catalog.projector_names() == ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k", "q4_k", "q4_0")
    assert catalog.lookup_projector("Q4_K").ggml_type == G.Q4_K
    assert catalog.lookup_projector("q5_k").ggml_type == G.Q5_K
    with pytest.raises(QuantError, match="q4_k_m is a|mixes such as q4_k_m"):
        catalog.lookup_projector("q4_k_m")


def test_lookup_is_case_insensitive_and_aliases_resolve():
    assert catalog.lookup("Q4_K_M").name == "q4_k_m"
    assert catalog.canonical("q4_k") == "q4_k_m"
    assert catalog.canonical("q8_0") == "q8_0"


def test_unknown_type_lists_the_valid_names():
    with pytest.raises(QuantError) as e:
        catalog.lookup("q7_k")
    msg = str(e.value)
    assert "'q7_k'" in msg and "q4_k_m" in msg and "iq2_xxs" in msg and "f16" in msg
    assert isinstance(e.value, ValueError)


def test_default_projector_type():
    assert catalog.default_projector_type("q4_k_m") == "q8_0"
    assert catalog.default_projector_type("bf16") == "bf16"
    assert catalog.default_projector_type("f32") == "f32"


def test_kv_types_are_llama_cpp_cache_types():
    assert [t.name for t in kv.KV_TYPES] == ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
    assert kv.kv_type("Q8_0").bytes_per_element == pytest.approx(34 / 32)
    assert kv.kv_type("q4_0").needs_flash_attn_for_v and not kv.kv_type("f16").needs_flash_attn_for_v
    with pytest.raises(QuantError, match="q8_0"):
        kv.kv_type("q4_k")


def test_kv_bytes_per_token_for_the_2b_shapes():
    # Qwen3-VL-2B: 28 layers, 8 KV heads of 128.
    assert kv.kv_bytes_per_token(28, 8, 128, "f16") == 28 * 2 * 1024 * 2
    assert kv.kv_bytes_per_token(28, 8, 128, "q8_0") == 28 * 2 * (1024 // 32 * 34)
    assert kv.kv_bytes_per_token(28, 8, 128, "f16", "q4_0") == 28 * (2048 + 1024 // 32 * 18)
    assert kv.kv_bytes(28, 8, 128, 4000, "f16") == 28 * 2 * 2048 * 4096  # llama.cpp pads n_ctx to 256


def test_kv_row_not_fitting_the_block_is_an_error():
    with pytest.raises(QuantError, match="multiples of 32"):
        kv.kv_bytes_per_token(2, 1, 48, "q4_0")
