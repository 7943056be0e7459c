"""The one llama.cpp access layer: every model, context, batch, sampler and projector of the project is made here.

Bottom package: imports llama_cpp, gguf and edge_common only; nothing else in
the project imports llama_cpp (tests/test_layers.py). Modules: objects (the
text model and its context), batch (token and embedding batches), projector
(mtmd: bitmaps, chunks, tokenize, encode), sampler (sampler chains, grammars),
quantize (llama_model_quantize), params (the load-parameter builder), amx
(whether AMX may hold weights here; amx_setting: the user's AMX setting), offload
(GPU layers, the projector's device, flash attention), bufts (ggml's extra buffer types), kv
(KV-cache types), log / backend (the one log capture, process init), crash
(why a child died), probe (the AMX/repack probe child), graph_watch (timing or
stopping a graph), baseline (llama-cpp-python's high-level API, for edge-bench
only); ggml_devices, rpc and placement bind what llama-cpp-python does not
(ggml devices, RPC workers).
"""
from .amx_setting import AMX_ENV, resolve_amx
from .backend import capture, ensure_backend, log_suffix, system_info, take_errors
from .batch import Batch, EmbeddingBatch
from .errors import KVTypeError, LlamaError, LlamaLoadError, LoadOptionError
from .hardware import physical_cores
from .kv import KV_TYPES, KVType, kv_type
from .objects import (DECODE_REASONS, FLASH_ATTN_AUTO, FLASH_ATTN_OFF, FLASH_ATTN_ON, Context, ContextOptions, Model,
                      model_meta)
from .owned import Closeable
from .params import CPU_UBATCH, LoadOptions, resolve_mmap, resolve_ubatch
from .projector import (Bitmap, ChunkInfo, Chunks, Projector, ProjectorOptions, chunk_info, chunk_is_text,
                        chunk_text_tokens, default_marker, image_grid, image_positions)
from .sampler import JSON_GBNF, Sampler, SchemaConverter, json_schema_to_gbnf

__all__ = [
    "AMX_ENV", "Batch", "Bitmap", "CPU_UBATCH", "ChunkInfo", "Chunks", "Closeable", "Context", "ContextOptions",
    "DECODE_REASONS", "EmbeddingBatch", "FLASH_ATTN_AUTO", "FLASH_ATTN_OFF", "FLASH_ATTN_ON", "JSON_GBNF", "KVType",
    "KVTypeError", "KV_TYPES", "LlamaError", "LlamaLoadError", "LoadOptionError", "LoadOptions", "Model", "Projector",
    "ProjectorOptions", "Sampler", "SchemaConverter", "capture", "chunk_info", "chunk_is_text", "chunk_text_tokens",
    "default_marker", "ensure_backend", "image_grid", "image_positions", "json_schema_to_gbnf", "kv_type",
    "log_suffix", "model_meta", "physical_cores", "resolve_amx", "resolve_mmap", "resolve_ubatch", "system_info",
    "take_errors",
]
