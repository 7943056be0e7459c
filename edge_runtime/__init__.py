"""Edge runtime for Qwen3-VL GGUF pairs on llama.cpp.

    from edge_runtime import VisionChat
    with VisionChat.from_dir("models/") as chat:
        print(chat.ask("What is in this picture?", images=["photo.jpg"]))

Names are imported lazily, so `import edge_runtime.vision.images` does not load llama.cpp.
"""
from __future__ import annotations

from edge_common.lazy_exports import lazy_getattr

_EXPORTS = {
    "VisionChat": "chat.chat",
    "Engine": "core.engine",
    "EngineOptions": "core.options",
    "GenerationOptions": "core.options",
    "GenerationStats": "core.stats",
    "ImageInput": "vision.image_input",
    "ImageError": "vision.images",
    "ImageLimits": "vision.images",
    "VideoError": "vision.video",
    "VideoInput": "vision.video",
    "VideoOptions": "vision.video",
    "EdgeRuntimeError": "errors",
    "ModelFileError": "errors",
    "ModelLoadError": "errors",
    "ProjectorMismatchError": "errors",
    "VisionUnsupportedError": "errors",
    "EmptyPromptError": "errors",
    "ContextOverflowError": "errors",
    "DecodeError": "errors",
    "EngineClosedError": "errors",
    "SavedConversationError": "errors",
    "create_qwen3_vl_2b_plugin": "chat.plugin",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
