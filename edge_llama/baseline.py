"""llama-cpp-python's high-level API (`Llama` + `MTMDChatHandler`), only as a benchmark baseline.

edge-bench compares the runtime with what a Python user gets without it. That
baseline must be llama-cpp-python's own chat stack, unwrapped (routing it
through edge_llama's objects would measure edge_llama again), so this module
hands it out as it is; nothing else in the project uses it.
"""
from __future__ import annotations

from typing import Any


def open_chat_llama(text_path: str, mmproj_path: str, *, use_gpu: bool, **llama_kwargs: Any) -> Any:
    """A `llama_cpp.Llama` with an `MTMDChatHandler` for the projector; kwargs go to `Llama` unchanged."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler

    handler = MTMDChatHandler(clip_model_path=str(mmproj_path), verbose=False, use_gpu=use_gpu)
    return Llama(model_path=str(text_path), chat_handler=handler, **llama_kwargs)
