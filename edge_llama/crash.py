"""Say why a child process died: which signal, the likely cause, the setting that avoids it."""
from __future__ import annotations

import signal

# signal -> (likely cause, what avoids it). Native crashes in this project come from llama.cpp's kernels
# (AMX tile faults: ggml-org/llama.cpp PR #26954), memory pressure, or a file changing under mmap.
_CAUSES = {
    signal.SIGILL: ("an illegal instruction in a llama.cpp CPU kernel (on Intel Xeons with AMX: llama.cpp's AMX "
                    "matmul kernels fault, ggml-org/llama.cpp PR #26954)",
                    "set EDGE_AMX=off (or amx=False / --extra-bufts repack); --no-repack turns all extra buffer types off"),
    signal.SIGSEGV: ("a crash inside llama.cpp (a repacked or AMX kernel, or a file llama.cpp misread)",
                     "retry with EDGE_AMX=off or --no-repack; if it persists, re-convert the GGUF"),
    signal.SIGBUS: ("the model file changed or was truncated while it was memory-mapped",
                    "do not rewrite GGUF files in use, or load with mmap=False (--no-mmap)"),
    signal.SIGKILL: ("the kernel's out-of-memory killer (or a timeout) stopped it",
                     "lower n_ctx / image_max_tokens, use a smaller quant, or free memory"),
    signal.SIGABRT: ("a llama.cpp assertion (GGML_ASSERT) failed; its message is on stderr",
                     "see the stderr lines above; often a model/setting combination llama.cpp does not support"),
}


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe_exit(returncode: int) -> str:
    """"exit code N" or "killed by SIGILL (signal 4): <cause>; avoid it: <setting>"."""
    if returncode >= 0:
        return f"exit code {returncode}"
    signum = -returncode
    text = f"killed by {signal_name(signum)} (signal {signum})"
    try:
        cause, fix = _CAUSES[signal.Signals(signum)]
    except (KeyError, ValueError):
        return text
    return f"{text}: likely {cause}; to avoid it: {fix}"
