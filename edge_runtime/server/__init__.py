"""`edge-serve`: an OpenAI-compatible local server with continuous batching.

    from edge_runtime.server import ServerOptions, create_app
    app = create_app(ServerOptions(model_dir="models/", parallel=4))   # an ASGI app for uvicorn

Modules: `config` (options), `schemas` (request validation), `security` (auth,
limits, Host/Origin/Content-Type guard, image sources), `prompting` (messages ->
prompt), `scheduler` (the batching thread) with `slots`, `batching`, `prefill`
(chunked prompts, the vision thread), `logit_bias`, `jobs`;
`engine_host` / `engine_process` (the scheduler in a restarted child process);
`responses` (OpenAI shapes), `errors`, `metrics` (Prometheus), `app` (routes),
`cli` (the command), `process` (run it as a child process: tests, benchmarks).
FastAPI and uvicorn are needed: pip install 'qwen3-vl-edge[server]'.
"""
from __future__ import annotations

from .config import ServerOptions

__all__ = ["ServerOptions", "create_app"]


def __getattr__(name: str):
    if name == "create_app":  # lazily: importing the options must not need FastAPI
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'edge_runtime.server' has no attribute {name!r}")
