"""Exceptions the runtime raises, so callers can tell user mistakes from engine faults.

Every error leaves the engine usable: the conversation and KV cache are rolled
back to their state before the failed call.
"""
from __future__ import annotations

from edge_common.errors import EdgeError, ModelFileError

__all__ = ["ChatBusyError", "ContextOverflowError", "OptionError", "DecodeError", "EdgeRuntimeError", "EmptyPromptError", "EngineClosedError",
           "ModelFileError", "ModelLoadError", "ProjectorMismatchError", "PromptEncodingError",
           "SavedConversationError", "VisionUnsupportedError"]  # ModelFileError: edge_common's, the one for every layer


class EdgeRuntimeError(EdgeError):
    """Base class of the engine's errors (images, templates and grounding have their own EdgeError classes)."""


class ModelLoadError(EdgeRuntimeError):
    """llama.cpp refused to load a file; the message carries its log lines."""


class ProjectorMismatchError(ModelLoadError):
    """The projector's output width differs from the text model's input width."""


class OptionError(EdgeRuntimeError, ValueError):
    """An engine, generation or image option has the wrong type or is out of range; the message names it."""


class VisionUnsupportedError(EdgeRuntimeError, ValueError):
    """Images were given to an engine that has no (vision) projector."""


class EmptyPromptError(EdgeRuntimeError, ValueError):
    """Nothing to answer: no text and no image."""


class PromptEncodingError(EdgeRuntimeError, ValueError):
    """The prompt holds text that is not encodable as UTF-8 (a lone surrogate)."""


class ContextOverflowError(EdgeRuntimeError, ValueError):
    """The prompt plus the requested `max_tokens` do not fit in `n_ctx`."""


class GrammarError(EdgeRuntimeError, ValueError):
    """llama.cpp could not parse a GBNF grammar; the message carries its parser's complaint."""


class DecodeError(EdgeRuntimeError):
    """llama.cpp failed while evaluating a batch or encoding an image."""


class ChatBusyError(EdgeRuntimeError, RuntimeError):
    """A chat call came from the thread still iterating one of its streams: waiting would deadlock."""


class EngineClosedError(EdgeRuntimeError):
    """The engine was used after `close()`."""


class ImageNotCachedError(EdgeRuntimeError, ValueError):
    """An image given by its digest alone (a restored conversation's) that this engine holds neither
    in a sequence's cells nor in an encoder cache: its pixels must be sent again."""


class SavedConversationError(EdgeRuntimeError, ValueError):
    """A saved conversation cannot be read, or does not fit the model it is restored into."""


class TunedSettingsError(EdgeRuntimeError, ValueError):
    """A tuned-settings file (edge-bench --tune) that is damaged, foreign or holds a bad setting: the
    load warns and goes on with the built-in defaults."""
