"""The one llama.cpp access layer: every model, context, batch and projector of the project is made here.

Bottom package: imports llama_cpp, gguf and edge_common only. Modules:
objects (the wrapped C objects), params (the load-parameter builder), amx
(whether AMX may hold weights here; amx_setting: the user's AMX setting), offload
(GPU layers, the projector's device, flash attention), bufts (ggml's extra buffer types), kv
(KV-cache types), log / backend (the one log capture, process init), crash
(why a child died), probe (the AMX/repack probe child); ggml_devices, rpc and
placement bind what llama-cpp-python does not (ggml devices, RPC workers).
"""
from .amx_setting import AMX_ENV, resolve_amx
from .backend import capture, ensure_backend, log_suffix, take_errors
from .errors import KVTypeError, LlamaError, LlamaLoadError, LoadOptionError
from .hardware import physical_cores
from .kv import KV_TYPES, KVType, kv_type
from .objects import (Batch, Bitmap, Chunks, Closeable, Context, ContextOptions, Model, Projector, ProjectorOptions,
                      chunk_is_text, chunk_text_tokens, model_meta)
from .params import CPU_UBATCH, LoadOptions, resolve_mmap, resolve_ubatch

__all__ = [
    "AMX_ENV", "Batch", "Bitmap", "Closeable", "CPU_UBATCH", "Chunks", "Context", "ContextOptions", "KVType", "KVTypeError",
    "KV_TYPES", "LlamaError", "LlamaLoadError", "LoadOptionError", "LoadOptions", "Model", "Projector",
    "ProjectorOptions", "capture", "chunk_is_text", "chunk_text_tokens", "ensure_backend", "kv_type", "log_suffix",
    "model_meta", "physical_cores", "resolve_amx", "resolve_mmap", "resolve_ubatch", "take_errors",
]
