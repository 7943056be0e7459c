"""edge_llama: the one llama.cpp access layer, and AMX-safe loading.

The AMX fault (llama.cpp PR #26954) cannot happen on a CPU without AMX, so the
decision is exercised with the real probe child: a test hook makes it die by a
genuine SIGILL, and the fallback (CPU_REPACK through tensor_buft_overrides,
extra buffer types off) is loaded and run for real on this machine.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from edge_llama import Context, ContextOptions, LoadOptionError, LoadOptions, Model, resolve_amx
from edge_llama import amx, bufts
from edge_llama.crash import describe_exit
from edge_llama.probe import write_probe_model

ROOT = Path(__file__).resolve().parents[1]
# Load and free functions of llama.cpp/mtmd (and the process-wide log hook): only edge_llama may call them.
OWNED = re.compile(r"\b(llama_model_load_from_file|llama_load_model_from_file|mtmd_init_from_file|"
                   r"llama_init_from_model|llama_new_context_with_model|llama_model_free|llama_free|mtmd_free|"
                   r"llama_batch_init|llama_batch_free|llama_backend_init|llama_log_set|mtmd_log_set|"
                   r"mtmd_helper_log_set)\b")


def test_nothing_outside_edge_llama_loads_or_frees_llama_objects():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("edge_llama", ".venv", "build") or rel == Path(__file__).relative_to(ROOT):
            continue
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if OWNED.search(line.split("#")[0]):
                offenders.append(f"{rel}:{no}: {line.strip()}")
    assert offenders == [], "load through edge_llama instead:\n" + "\n".join(offenders)


def test_tests_read_no_paths_outside_the_repository():
    bad = [f"{p.name}: {m.group(0)}" for p in sorted((ROOT / "tests").glob("*.py")) if p.name != Path(__file__).name
           for m in re.finditer(r"\.\./shared|\"/work/|parents\[2\]", p.read_text(encoding="utf-8"))]
    assert bad == []


@pytest.fixture(scope="module")
def probe_gguf(tmp_path_factory) -> Path:
    return write_probe_model(tmp_path_factory.mktemp("probe") / "probe.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(amx.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(amx.PROBE_SELF_SIGNAL_ENV, raising=False)
    monkeypatch.delenv("EDGE_AMX", raising=False)
    return tmp_path / amx.CACHE_FILE


def _run_a_few_tokens(model: Model) -> int:
    with Context(model, ContextOptions(n_ctx=64, n_batch=32, n_ubatch=32, n_threads=2)) as ctx:
        ctx.decode(list(range(16)), 0)
        token = int(np.argmax(ctx.logits()))
        ctx.decode([token], 16)
        return int(np.argmax(ctx.logits()))


def test_default_load_of_a_quantized_model_says_how(probe_gguf, cache, caplog):
    """Without an AMX buffer type (this AMD CI): repack as llama.cpp does, no probe. With one: the probe decides."""
    has_amx = bufts.AMX in {b.name for b in bufts.cpu_extra_buffer_types()}
    with caplog.at_level(logging.INFO, logger="edge_llama"):
        with Model(probe_gguf) as model:
            assert 0 <= _run_a_few_tokens(model) < 256
    lines = [r.getMessage() for r in caplog.records if r.name == "edge_llama" and r.getMessage().startswith("weights")]
    assert lines == [f"weights of probe.gguf: {model.how}"]
    if not has_amx:
        assert model.how == "read, CPU repack (no AMX on this CPU)"
        assert not cache.exists()  # nothing to probe, nothing cached
    else:
        assert re.match(r"read, (AMX \+ CPU repack \(AMX probe passed|CPU_REPACK without AMX; AMX not used: "
                        r"the amx probe was)", model.how), model.how
        assert cache.exists()


def test_probe_child_killed_by_sigill_is_named_with_cause_and_setting(cache, monkeypatch):
    monkeypatch.setenv(amx.PROBE_SELF_SIGNAL_ENV, "SIGILL")
    v = amx.run_probe("amx")
    assert not v.ok
    assert "killed by SIGILL (signal 4)" in v.detail and "AMX" in v.detail and "EDGE_AMX=off" in v.detail


def test_real_repack_probe_passes_here(cache):
    v = amx.run_probe("repack")
    assert v.ok and "CPU_REPACK" in v.detail


def test_verdict_is_cached_per_build_and_cpu(cache, monkeypatch):
    monkeypatch.setenv(amx.PROBE_SELF_SIGNAL_ENV, "amx=SIGILL")
    first = amx.verdict("amx")
    assert not first.ok and "SIGILL" in first.detail
    data = json.loads(cache.read_text())
    assert list(data) == [f"{amx.machine_key()}:amx"] and data[f"{amx.machine_key()}:amx"]["ok"] is False
    monkeypatch.delenv(amx.PROBE_SELF_SIGNAL_ENV)  # the probe would pass now: a cached verdict is not re-probed
    assert amx.verdict("amx") == first
    data[f"{amx.machine_key()}:amx"] = {"ok": True, "detail": "edited"}
    cache.write_text(json.dumps(data))
    assert amx.verdict("amx") == amx.Verdict(True, "edited")


def test_where_amx_faults_weights_keep_cpu_repack_without_amx(probe_gguf, cache, monkeypatch, caplog):
    """As on the Xeon of the issue: AMX advertised, its probe dies by SIGILL -> CPU_REPACK overrides, and it runs."""
    monkeypatch.setenv(amx.PROBE_SELF_SIGNAL_ENV, "amx=SIGILL")
    plan = amx.extra_bufts_plan(True, "auto", available=(bufts.AMX, bufts.CPU_REPACK))
    assert not plan.use_extra_bufts and plan.repack_overrides == bufts.find(bufts.CPU_REPACK).handle
    assert plan.how.startswith("CPU_REPACK without AMX; AMX not used: the amx probe was killed by SIGILL")
    from edge_llama import capture

    with caplog.at_level(logging.INFO, logger="edge_llama"), capture() as log:
        with Model(probe_gguf, LoadOptions(), plan=plan) as model:
            assert 0 <= _run_a_few_tokens(model) < 256
    assert "CPU_REPACK model buffer size" in log.text and "AMX model buffer" not in log.text
    # the probe model's repackable weights: 4 attention + ffn_down + output (Q4_0); Q8_0 ffn stays plain
    assert model.how.startswith("read, CPU_REPACK without AMX") and model.how.endswith("(6 weights)")
    assert any("weights of probe.gguf: read, CPU_REPACK without AMX" in r.getMessage() for r in caplog.records)


def test_when_repack_fails_too_extra_buffer_types_are_off(probe_gguf, cache, monkeypatch):
    monkeypatch.setenv(amx.PROBE_SELF_SIGNAL_ENV, "SIGILL")
    plan = amx.extra_bufts_plan(True, "auto", available=(bufts.AMX, bufts.CPU_REPACK))
    assert (plan.use_extra_bufts, plan.repack_overrides) == (False, None)
    assert plan.how.startswith("no extra buffer types; AMX not used") and "CPU_REPACK without AMX failed too" in plan.how
    with Model(probe_gguf, plan=plan) as model:
        assert 0 <= _run_a_few_tokens(model) < 256


def test_forced_settings_skip_the_probe(cache):
    on = amx.extra_bufts_plan(True, "on", available=(bufts.AMX, bufts.CPU_REPACK))
    assert on.use_extra_bufts and "forced" in on.how
    off = amx.extra_bufts_plan(True, "off", available=(bufts.AMX, bufts.CPU_REPACK))  # repack probe runs, for real
    assert not off.use_extra_bufts and off.repack_overrides and "AMX off by setting" in off.how
    assert amx.extra_bufts_plan(False, "auto").how == "no extra buffer types (repack off)"


def test_amx_option_and_environment(monkeypatch):
    monkeypatch.delenv("EDGE_AMX", raising=False)
    assert resolve_amx("auto") == "auto" and resolve_amx(False) == "off" and resolve_amx(True) == "on"
    monkeypatch.setenv("EDGE_AMX", "off")
    assert resolve_amx("auto") == "off" and resolve_amx(True) == "on"  # an explicit option wins
    monkeypatch.setenv("EDGE_AMX", "sometimes")
    with pytest.raises(LoadOptionError, match="EDGE_AMX"):
        resolve_amx("auto")
    with pytest.raises(LoadOptionError, match="amx must be"):
        LoadOptions(amx="maybe")


def test_exit_descriptions():
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(-9).startswith("killed by SIGKILL (signal 9): likely the kernel's out-of-memory killer")
    assert "mmap" in describe_exit(-7)


# ---------------------------------------------------------------- every C object: made and freed once, in edge_llama

# init -> free of each C object edge_llama wraps (module attribute of llama_cpp or llama_cpp.mtmd_cpp)
PAIRS = {
    "llama_model_load_from_file": "llama_model_free",
    "llama_init_from_model": "llama_free",
    "llama_batch_init": "llama_batch_free",
    "llama_sampler_chain_init": "llama_sampler_free",
    "mtmd_init_from_file": "mtmd_free",
    "mtmd_input_chunks_init": "mtmd_input_chunks_free",
    "mtmd_bitmap_init": "mtmd_bitmap_free",
}


class _Ledger:
    """Counts each init and free and remembers any call made from outside edge_llama."""

    def __init__(self, monkeypatch):
        import inspect

        from edge_llama.objects import L as llama_cpp  # the modules edge_llama calls, patched where they live
        from edge_llama.projector import M as mtmd_cpp

        self.calls: dict[str, int] = {name: 0 for pair in PAIRS.items() for name in pair}
        self.strangers: list[str] = []
        for name in self.calls:
            module = mtmd_cpp if name.startswith("mtmd_") else llama_cpp
            real = getattr(module, name)

            def watched(*args, _real=real, _name=name):
                caller = inspect.currentframe().f_back.f_globals.get("__name__", "?")
                if not caller.startswith("edge_llama."):
                    self.strangers.append(f"{_name} from {caller}")
                self.calls[_name] += 1
                return _real(*args)

            monkeypatch.setattr(module, name, watched)

    def unpaired(self) -> dict[str, tuple[int, int]]:
        return {init: (self.calls[init], self.calls[free]) for init, free in PAIRS.items()
                if self.calls[init] != self.calls[free]}


def test_every_wrapped_object_is_made_and_freed_once_inside_edge_llama(tiny_f32_dir, test_image, monkeypatch, tmp_path):
    """A chat with images, a video, a JSON schema, a saved and restored conversation, and the raw wrappers:
    each init has its free, and every one is called from edge_llama (a second wrapper or a leak fails)."""
    import gc

    import numpy as np

    from edge_llama import Batch, Bitmap, EmbeddingBatch, Sampler
    from edge_runtime import VisionChat

    ledger = _Ledger(monkeypatch)
    frames = [np.asarray(test_image.convert("RGB").resize((64, 48)))] * 4
    chat = VisionChat.from_dir(tiny_f32_dir, n_ctx=2048, threads=1)
    try:
        chat.ask("What is this?", images=[test_image], max_tokens=3, temperature=0.0)
        chat.ask("And now?", max_tokens=3, temperature=0.0)
        chat.ask("What happens?", videos=[frames], max_tokens=3, temperature=0.0)
        chat.generate([{"role": "user", "content": "json"}], max_tokens=4, json_schema={"type": "object"})
        chat.save(tmp_path / "chat.conv")
        chat.restore(tmp_path / "chat.conv")
        chat.encode_image(test_image)
        model = chat.engine.text_model
        chat.reset()  # the raw batch below writes sequence 0 behind the engine's bookkeeping
        with Batch(4) as batch, Sampler(model).greedy() as sampler, EmbeddingBatch(4):
            batch.fill([1, 2], 0)
            chat.engine.context.decode_batch(batch)
            sampler.sample(chat.engine.context, -1)
        Bitmap(None, size=(8, 8)).close()
    finally:
        chat.close()
    gc.collect()
    assert all(ledger.calls[init] > 0 for init in PAIRS), ledger.calls  # the scenario made every kind
    assert ledger.unpaired() == {}
    assert ledger.strangers == []


def test_the_ledger_sees_a_leak_and_a_second_wrapper(tiny_f32_dir, monkeypatch):
    """The check above can fail: a batch left open, and an init called from outside edge_llama."""
    from edge_llama import Batch
    from edge_llama.batch import L as llama_cpp  # reached through edge_llama: this module imports no llama_cpp

    ledger = _Ledger(monkeypatch)
    leaked = Batch(2)
    raw = llama_cpp.llama_batch_init(2, 0, 1)  # a second wrapper: this test module is not edge_llama
    assert ledger.unpaired() == {"llama_batch_init": (2, 0)}
    assert ledger.strangers == [f"llama_batch_init from {__name__}"]
    llama_cpp.llama_batch_free(raw)
    leaked.close()
    assert ledger.unpaired() == {}
