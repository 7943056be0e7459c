"""The engine's pure pieces: prefix planning, streaming text, caches, option checks."""
from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

from edge_llama import (CPU_UBATCH, FLASH_ATTN_AUTO, FLASH_ATTN_OFF, FLASH_ATTN_ON, kv_type, physical_cores, resolve_mmap,
                        resolve_ubatch)
from edge_llama.backend import return_freed_memory
from edge_llama.hardware import parse_cpuinfo_cores
from edge_llama.offload import resolve_flash_attn, resolve_gpu_layers
from edge_llama.ggml_devices import lib_dir
from edge_runtime.core.detokenize import StopMatcher, Utf8Stream
from edge_runtime.vision.encoder_cache import EncoderCache
from edge_runtime.core.kv_state import SeqState, common_prefix, image_unit, plan_reuse, text_units
from edge_runtime.core.options import EngineOptions, GenerationOptions
from edge_runtime.core.sampling import schema_to_grammar


def test_prefix_stops_at_image_boundaries_and_tracks_positions():
    state = SeqState()
    state.extend(text_units([1, 2, 3]))
    state.append(image_unit("aaa", n_tokens=48, n_pos=8))
    state.extend(text_units([4, 5]))
    assert (state.n_tokens, state.n_pos) == (53, 13)
    assert state.pos_of(3) == 3 and state.pos_of(4) == 11 and state.pos_of(len(state)) == 13

    other_image = text_units([1, 2, 3]) + [image_unit("bbb", 48, 8)] + text_units([4, 5])
    assert common_prefix(state.units, other_image) == 3
    same = text_units([1, 2, 3]) + [image_unit("aaa", 48, 8)] + text_units([4, 9, 9])
    assert plan_reuse(state, same) == 5
    # an identical prompt still re-evaluates its last unit (sampling needs fresh logits)
    assert plan_reuse(state, list(state.units)) == len(state) - 1

    assert state.truncate(4) == 11
    assert (state.n_tokens, state.n_pos, len(state)) == (51, 11, 4)
    assert state.image_digests() == {"aaa"}
    state.clear()
    assert (state.n_tokens, state.n_pos, len(state)) == (0, 0, 0)


def test_utf8_stream_waits_for_split_characters():
    data = "héllo 👋 ok".encode()
    stream = Utf8Stream()
    out = "".join(stream.feed(data[i : i + 1]) for i in range(len(data))) + stream.flush()
    assert out == "héllo 👋 ok"
    stream = Utf8Stream()
    assert stream.feed("👋".encode()[:2]) == ""
    assert stream.flush() == "\ufffd"  # a dangling half character is replaced, not raised


@pytest.mark.parametrize(
    "pieces,stops,shown,stopped",
    [
        (["Hel", "lo ST", "OP there"], ("STOP",), "Hello ", True),
        (["abc", "de"], ("xyz",), "abcde", False),
        (["a<", "/a", "ns>b"], ("</ans>",), "a", True),
        (["a<", "b"], ("<x>",), "a<b", False),
        (["one", " two"], (), "one two", False),
    ],
)
def test_stop_matcher_never_leaks_a_stop_string(pieces, stops, shown, stopped):
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        text, done = matcher.feed(piece)
        out.append(text)
        if done:
            break
    out.append(matcher.flush())
    assert "".join(out) == shown and matcher.stopped == stopped


def test_encoder_cache_is_lru_and_bounded_in_bytes():
    cache = EncoderCache(max_bytes=3 * 400)
    arrays = {k: np.full(100, i, np.float32) for i, k in enumerate("abcd")}  # 400 bytes each
    for k in "abc":
        cache.put(k, arrays[k])
    assert np.array_equal(cache.get("a"), arrays["a"])  # the stored values; a is now most recent
    cache.put("d", arrays["d"])
    assert "b" not in cache and all(k in cache for k in "acd")
    assert cache.nbytes == 1200 and len(cache) == 3
    cache.put("huge", np.zeros(1000, np.float32))  # larger than the budget: not kept
    assert "huge" not in cache and len(cache) == 3
    assert not cache.get("a").flags.writeable
    cache.clear()
    assert cache.nbytes == 0 and cache.get("a") is None


def test_cpuinfo_parsing_counts_physical_cores():
    smt = "\n\n".join(
        f"processor\t: {i}\nphysical id\t: 0\ncore id\t\t: {i % 4}" for i in range(8)
    )
    assert parse_cpuinfo_cores(smt) == 4
    two_sockets = "\n\n".join(f"processor: {i}\nphysical id: {i // 2}\ncore id: {i % 2}" for i in range(4))
    assert parse_cpuinfo_cores(two_sockets) == 4
    assert parse_cpuinfo_cores("processor: 0\nmodel name: arm\n") == 0


def test_physical_cores_matches_lscpu():
    """util-linux's lscpu, not our parser, says which core each usable logical CPU sits on.
    (ARM boards' big.LITTLE choice is tested on their real files in test_hardware.py.)"""
    rows = subprocess.run(["lscpu", "-p=CPU,CORE,SOCKET"], capture_output=True, text=True, check=True).stdout
    allowed = os.sched_getaffinity(0)  # this suite runs on Linux
    cores = {(socket, core) for cpu, core, socket in
             (line.split(",") for line in rows.splitlines() if line and not line.startswith("#"))
             if int(cpu) in allowed}
    assert physical_cores() == len(cores)


def test_quantized_v_cache_turns_flash_attention_on(caplog):
    with caplog.at_level("INFO", logger="edge_runtime"):
        assert resolve_flash_attn("auto", kv_type("q8_0")) == FLASH_ATTN_ON
    assert "needs flash attention" in caplog.text
    assert resolve_flash_attn("auto", kv_type("f16")) == FLASH_ATTN_AUTO
    assert resolve_flash_attn(False, kv_type("f16")) == FLASH_ATTN_OFF
    with pytest.raises(ValueError, match="needs flash attention"):
        resolve_flash_attn(False, kv_type("q4_0"))
    with pytest.raises(ValueError, match="unknown KV cache type"):
        kv_type("q3_k")
    assert kv_type("Q8_0").row_bytes(128) == 136 and kv_type("q4_0").row_bytes(128) == 72


def test_gpu_layers_auto_follows_the_build():
    """'auto' offloads when this machine has a GPU; an RPC-capable build alone (llama_supports_gpu_offload
    is then true too, llama.cpp's llama.cpp:llama_supports_gpu_offload) is no reason to."""
    pattern = {"linux": "libggml.so*", "darwin": "libggml.dylib"}.get(sys.platform, "ggml.dll")
    ggml = ctypes.CDLL(str(next(p for p in lib_dir().glob(pattern))))
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    has_gpu = any(ggml.ggml_backend_dev_by_type(t) for t in (1, 2))  # GGML_BACKEND_DEVICE_TYPE_GPU, _IGPU
    expected = -1 if has_gpu else 0
    assert resolve_gpu_layers("auto") == expected
    assert resolve_gpu_layers(7) == 7
    with pytest.raises(ValueError):
        resolve_gpu_layers("all")


def test_option_validation():
    with pytest.raises(ValueError, match="unknown KV cache type"):
        EngineOptions(kv_cache_type_v="q2")
    with pytest.raises(ValueError, match="image_min_tokens"):
        EngineOptions(image_min_tokens=512, image_max_tokens=256)
    with pytest.raises(ValueError, match="temperature"):
        GenerationOptions(temperature=-1)
    with pytest.raises(ValueError, match="either grammar or json_schema"):
        GenerationOptions(grammar="root ::= \"a\"", json_schema={"type": "string"})
    opts = GenerationOptions().updated({"stop": ["a", ""], "max_tokens": 3})
    assert opts.stop == ("a",) and opts.max_tokens == 3
    assert GenerationOptions(stop="x").stop == ("x",)
    with pytest.raises(TypeError, match="unknown generation option"):
        GenerationOptions().updated({"temprature": 0})


def test_weights_are_read_not_mapped_when_cpu_layers_are_repacked():
    # CPU + repack: the mapped pages would stay resident beside the repacked copy.
    assert resolve_mmap("auto", 0, repack=True) is False
    assert resolve_mmap("auto", 0, repack=False) is True
    assert resolve_mmap("auto", -1, repack=True) is True
    assert resolve_mmap(True, 0, repack=True) is True and resolve_mmap(False, -1, repack=False) is False
    with pytest.raises(ValueError, match="mmap must be"):
        resolve_mmap("yes", 0, repack=True)


def test_ubatch_is_small_on_the_cpu_and_whole_on_a_gpu():
    assert resolve_ubatch(None, 512, 0) == CPU_UBATCH
    assert resolve_ubatch(None, 32, 0) == 32  # never above n_batch
    assert resolve_ubatch(None, 512, -1) == 512
    assert resolve_ubatch(256, 512, 0) == 256 and resolve_ubatch(1024, 512, 0) == 512
    with pytest.raises(ValueError, match="n_ubatch"):
        EngineOptions(n_ubatch=0)
    with pytest.raises(ValueError, match="mmap must be"):
        EngineOptions(mmap="never")


# In a fresh interpreter: free a 1 MiB block, allocate the same size again, and say whether the
# second one came from the brk heap (it then stays resident after free) -- read from /proc/self/maps and sbrk(0).
_REUSE_PROBE = r"""
import ctypes, sys
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
if sys.argv[1] == "fixed":
    from edge_llama.backend import return_freed_memory
    print(return_freed_memory())
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
libc.free(libc.malloc(1 << 20))
again = libc.malloc(1 << 20)
brk = libc.sbrk(0)
# The brk heap: the kernel labels it [heap]; QEMU's user-mode /proc/self/maps (the arm64 lane) does not,
# so it is also known as the mapping that ends at the program break.
maps = [(line, [int(x, 16) for x in line.split()[0].split("-")]) for line in open("/proc/self/maps")]
heap = [(lo, hi) for line, (lo, hi) in maps if "[heap]" in line or hi == brk]
print(any(lo <= again < hi for lo, hi in heap))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads glibc's behaviour through /proc/self/maps")
def test_freed_buffers_go_back_to_the_os_unless_malloc_is_tuned(monkeypatch):
    """glibc alone raises its mmap threshold after a large free, so the next buffer of that size lands
    on the heap; after return_freed_memory() it is mapped again (and unmapped when freed)."""
    def probe(mode: str) -> list[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_")}
        out = subprocess.run([sys.executable, "-c", _REUSE_PROBE, mode], cwd=Path(__file__).parents[1], env=env,
                             capture_output=True, text=True, check=True)
        return out.stdout.split()

    assert probe("default") == ["True"]  # the probe sees glibc's own behaviour: the buffer is on the heap
    assert probe("fixed") == ["True", "False"]  # set, and the same buffer is now a mapping of its own
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert return_freed_memory() is False  # the user's setting wins


def test_json_schema_becomes_gbnf():
    grammar = schema_to_grammar({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]})
    assert "root ::=" in grammar and "ok" in grammar
    assert schema_to_grammar(json.dumps({"type": "integer"}))
    with pytest.raises(ValueError, match="JSON schema"):
        schema_to_grammar("{not json")


def write_gguf(path, pos_dtype):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "clip")
    writer.add_tensor("v.position_embd.weight", np.zeros((4, 8), dtype=pos_dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_projector_preflight_catches_what_would_abort_llama_cpp(tmp_path):
    from edge_common.preflight import projector_problems

    assert projector_problems(write_gguf(tmp_path / "ok.gguf", np.float32)) == []
    (problem,) = projector_problems(write_gguf(tmp_path / "bad.gguf", np.float16))
    assert "v.position_embd.weight" in problem and "F16" in problem and "F32" in problem
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    (problem,) = projector_problems(tmp_path / "junk.gguf")
    assert "not a readable GGUF" in problem
