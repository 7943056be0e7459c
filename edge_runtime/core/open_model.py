"""One way to open a model for chatting, used by `VisionChat` and the server alike:
user-facing settings (paths, any sequence) -> `EngineOptions`, then the engine
and the chat template it answers with."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from edge_runtime.core.engine import Engine
from edge_runtime.core.options import EngineOptions
from edge_runtime.core.template import ChatTemplate, template_for

def engine_options(
    *,
    encoder_cache_dir: str | Path | None = None,
    encoder_cache_disk_mb: float | None = None,
    cost_cache_dir: str | Path | None = "auto",
    rpc_servers: Sequence[str] | str = (),
    tensor_split: Sequence[float] | None = None,
    **rest: Any,
) -> EngineOptions:
    """`EngineOptions` from what a person sets (paths, any sequence); the other fields (`rest`) pass as
    they are, and whatever is not given (or None for the disk bound) keeps EngineOptions' default."""
    extra: dict[str, Any] = {}
    if encoder_cache_disk_mb is not None:
        extra["encoder_cache_disk_mb"] = encoder_cache_disk_mb
    return EngineOptions(
        encoder_cache_dir=str(encoder_cache_dir) if encoder_cache_dir else None,
        cost_cache_dir=str(cost_cache_dir) if cost_cache_dir else None,  # "auto": the user cache dir
        rpc_servers=rpc_servers if isinstance(rpc_servers, str) else tuple(rpc_servers),
        tensor_split=tuple(tensor_split) if tensor_split is not None else None,
        **extra,
        **rest,
    )


def open_engine(model: str | Path, mmproj: str | Path | None, options: EngineOptions,
                chat_template: str | None = None) -> tuple[Engine, ChatTemplate]:
    """The loaded engine and its chat template (`chat_template` overrides the GGUF's); the engine
    is closed again when the template cannot be had, so a failure leaks no model."""
    engine = Engine(model, mmproj, options)
    try:
        return engine, template_for(engine, chat_template)
    except BaseException:
        engine.close()
        raise
