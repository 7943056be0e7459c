"""The child process that tries one way of holding weights: `python -m edge_llama.probe amx|repack`.

It writes a tiny llama-architecture GGUF (no tokenizer, 256 dummy tokens)
whose matmul weights are Q4_0 (taken by AMX and by CPU_REPACK) and Q8_0
(taken by AMX), with shapes both kernels accept, loads it with that mode's
buffer types, and runs a 32-token prefill and 4 decode steps on at least two
threads: llama.cpp's AMX matmul (ggml-cpu/amx/mmq.cpp) uses the tile
instructions for more than one row (the prefill) and AVX-512 VNNI for one (the
decode), split over worker threads, where the faults of PR #26954 happen. Exit 0 and one line on stdout
when it ran to the end; any crash is the parent's verdict.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np

N_VOCAB, N_EMBD, N_FF, N_HEAD = 256, 256, 512, 4


def write_probe_model(path: str | Path, seed: int = 0) -> Path:
    """A 1-layer llama GGUF with quantized matmul weights (gguf-py's own Q4_0/Q8_0 quantizer)."""
    import gguf
    from gguf import GGMLQuantizationType as G

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(1)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_vocab_size(N_VOCAB)
    w.add_tokenizer_model("no_vocab")

    def add(name: str, rows: int, cols: int, qtype: G | None) -> None:
        data = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        if qtype is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    add("token_embd.weight", N_VOCAB, N_EMBD, None)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(N_EMBD, np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(N_EMBD, np.float32))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        add(f"blk.0.{name}.weight", N_EMBD, N_EMBD, G.Q4_0)
    add("blk.0.ffn_gate.weight", N_FF, N_EMBD, G.Q8_0)
    add("blk.0.ffn_up.weight", N_FF, N_EMBD, G.Q8_0)
    add("blk.0.ffn_down.weight", N_EMBD, N_FF, G.Q4_0)
    add("output.weight", N_VOCAB, N_EMBD, G.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def run(mode: str, model_path: Path) -> str:
    """Load with MODE's buffer types and run prefill + decode; returns a one-line summary."""
    from . import amx, bufts
    from .backend import capture
    from .hardware import physical_cores
    from .objects import Context, ContextOptions, Model
    from .params import LoadOptions

    if mode == "amx":
        plan = amx.ExtraBufts(True, None, "all extra buffer types (AMX probe)")
    elif mode == "repack":
        repack = bufts.find(bufts.CPU_REPACK)
        if repack is None:
            raise SystemExit("this llama.cpp build has no CPU_REPACK buffer type")
        plan = amx.ExtraBufts(False, repack.handle, "CPU_REPACK only (repack probe)")
    else:
        raise SystemExit(f"unknown probe mode {mode!r}; use amx or repack")
    threads = max(2, physical_cores())
    with capture() as log:
        with Model(model_path, LoadOptions(mmap=False), plan=plan) as model, \
                Context(model, ContextOptions(n_ctx=128, n_batch=64, n_ubatch=64, n_threads=threads)) as ctx:
            tokens = [int(t) for t in np.arange(32) * 7 % N_VOCAB]
            ctx.decode(tokens, 0)
            for i in range(4):
                nxt = int(np.argmax(ctx.logits(-1)))
                ctx.decode([nxt], len(tokens) + i)
    used = sorted({b for b in ("AMX", "CPU_REPACK") if f"{b} model buffer size" in log.text})
    if mode == "repack" and "CPU_REPACK" not in used:
        raise SystemExit("the CPU_REPACK override did not take: llama.cpp reported no CPU_REPACK buffer")
    return f"{mode} ok on {threads} threads; weight buffers: {', '.join(used) or 'CPU'}"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m edge_llama.probe amx|repack", file=sys.stderr)
        return 2
    from .amx import PROBE_SELF_SIGNAL_ENV

    hook = os.environ.get(PROBE_SELF_SIGNAL_ENV, "")  # test hook: "SIGILL" (every mode) or "amx=SIGILL"
    mode, _, sig = hook.rpartition("=")
    if sig and mode in ("", argv[0]):  # die the way a faulting kernel kills the process
        os.kill(os.getpid(), getattr(signal, sig))
    with tempfile.TemporaryDirectory(prefix="edge-llama-probe-") as tmp:
        print(run(argv[0], write_probe_model(Path(tmp) / "probe.gguf")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
