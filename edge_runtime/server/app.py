"""The HTTP API: OpenAI-compatible routes over the scheduler.

Handlers stay on the asyncio loop and never call llama.cpp: images are decoded
and prompts rendered in worker threads, generation happens in the scheduler
thread, and its events come back through each job's channel.

The API routes live in one router mounted under each of `API_PREFIXES`: "/v1"
(OpenAI's base URL) and "" (llama-server also answers /chat/completions, /models,
/health, so a client moved from it with a base URL without /v1 keeps working).
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge_common.manifest import resolve_model_paths
from edge_runtime.core.logprobs import TokenLogprob
from edge_runtime.core.stats import GenerationStats
from edge_runtime.core.options import GenerationOptions
from edge_runtime.chat.chat import last_user_text
from edge_runtime.chat.tool_calls import ToolCall, ToolCallStream, parse_calls
from edge_runtime.vision.image_budget import image_need
from .config import ServerOptions
from .conversations import add_conversation_routes
from .errors import ApiError, bad_request, from_exception
from .jobs import Event, EventChannel, Failed, Finished, Job, TextDelta
from .metrics import Metrics
from .page import PAGE_HEADERS, STATIC_DIR
from .prompting import RenderedPrompt, render_prompt
from .responses import (
    SSE_DONE,
    ChoiceResult,
    ResponseMeta,
    chunk_body,
    completion_body,
    finish_with_calls,
    model_body,
    sse,
    tool_call_deltas,
    usage_chunk_body,
)
from .engine_host import RESTARTING, STALLED, EngineHost
from .fingerprint import system_fingerprint
from .front import LOADING, READY
from .scheduler import Scheduler
from .schemas import ChatRequest, generation_options, parse_chat_request, template_messages, tool_plan
from .security import AuthMiddleware, BodyLimitMiddleware, BrowserGuardMiddleware, ImagePolicy

log = logging.getLogger("edge_runtime.server")

DISCONNECT_POLL_S = 0.5
API_PREFIXES = ("/v1", "")  # OpenAI's base URL, and llama-server's routes without it


class EventStreamResponse(StreamingResponse):
    """Server-sent events that call `on_close` however the stream ends (done, error, client gone)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def create_app(options: ServerOptions) -> FastAPI:
    metrics = Metrics()
    scheduler: Scheduler | EngineHost = (
        EngineHost(options, metrics, logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower())
        if options.engine_process else Scheduler(options, metrics))
    policy = ImagePolicy(options.max_image_bytes, options.allow_remote_images, options.allow_local_dir,
                         options.remote_fetch_timeout_s, scheduler.plan_image, options.detail)
    started = int(time.time())
    fingerprint: asyncio.Future[str | None] | None = None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        nonlocal fingerprint
        scheduler.start()  # loads the model in its thread: /health says "loading" meanwhile
        fingerprint = asyncio.ensure_future(run_in_threadpool(fingerprint_of, options))  # reads the files meanwhile
        yield
        await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="edge-serve", docs_url=None, redoc_url=None, openapi_url="/openapi.json", lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    app.add_middleware(BodyLimitMiddleware, max_bytes=options.max_body_bytes)
    app.add_middleware(AuthMiddleware, api_key=options.api_key, admin_key=options.admin_key)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if options.cors_origins:  # listed origins: preflights answered, CORS headers added
        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.add_middleware(BrowserGuardMiddleware, allowed_hosts=options.allowed_hosts,  # added last = runs first
                       cors_origins=options.cors_origins, loopback_bind=options.loopback_only)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(exc.status_code, str(exc.detail), kind, None, None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(from_exception(exc))

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        """The chat page: static files talking to the public API below."""
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(scheduler.gauges()), media_type="text/plain; version=0.0.4")

    api = APIRouter()  # mounted under each of API_PREFIXES below

    @api.get("/health")
    async def health() -> JSONResponse:
        if scheduler.state == READY:
            g = scheduler.gauges()
            return JSONResponse({"status": "ok", "model": scheduler.model_id, "slots_busy": g.slots_busy,
                                 "slots_total": g.slots_total, "queue_depth": g.queue_depth})
        if scheduler.state == LOADING:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "2"})
        if scheduler.state in (RESTARTING, STALLED):  # stalled: until the new engine process is ready
            return JSONResponse({"status": scheduler.state, "restarts": scheduler.restarts,  # type: ignore[union-attr]
                                 "last_exit": scheduler.last_exit},  # type: ignore[union-attr]
                                status_code=503, headers={"Retry-After": "2"})
        return JSONResponse({"status": "error", "message": scheduler.error or scheduler.state}, status_code=503)

    @api.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_body(scheduler.model_id, started)]}

    @api.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != scheduler.model_id:
            raise ApiError(404, f"model {model_id!r} does not exist; this server has {scheduler.model_id!r}",
                           "not_found_error", "model", "model_not_found")
        return model_body(scheduler.model_id, started)

    @api.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrived = time.monotonic()
        scheduler.require_ready()
        try:
            req = parse_chat_request(await request.body())
            if req.n > options.parallel:
                raise bad_request(f"n={req.n} choices need {req.n} slots at once; this server has "
                                  f"{options.parallel} (--parallel)", "n")
            plan = tool_plan(req)
            gen = generation_options(req, plan, options.reasoning_budget)  # before any image is fetched or decoded
            rendered: RenderedPrompt = await run_in_threadpool(
                render_prompt, scheduler.prompt_format, template_messages(req), policy.loader(request_need(req)),
                policy.load_video, plan.template_tools(), req.chat_template_kwargs)
        # catching Exception: the request's door: from_exception turns a refusal into its 4xx and anything else into a logged 500
        except Exception as exc:
            error = from_exception(exc)
            if error.status < 500:
                metrics.request("invalid")
            raise error from None
        meta = ResponseMeta(scheduler.model_id, await fingerprint if fingerprint is not None else None)
        job = make_job(req, gen, rendered, deadline=arrived + options.timeout_s)
        scheduler.submit(job)
        watch = DisconnectWatch(request)
        try:
            first = await next_event(job, watch, scheduler)  # errors before any token keep their HTTP status
            if isinstance(first, Failed):
                raise first.error
            logprobs = bool(req.logprobs)
            if req.stream:
                return EventStreamResponse(stream_body(job, meta, first, req.include_usage, plan.active, logprobs),
                                           on_close=lambda: scheduler.cancel(job))
            return JSONResponse(await collect(job, watch, scheduler, meta, first, plan.active, logprobs))
        except BaseException:
            scheduler.cancel(job)
            raise

    add_conversation_routes(api, scheduler, options, policy)
    for prefix in API_PREFIXES:
        app.include_router(api, prefix=prefix)
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    return app


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI document with the request bodies the routes parse themselves (`ChatRequest`:
    they read raw bytes so that errors are OpenAI's 400s, not FastAPI's 422s), so clients and fuzzers
    (tests/test_server_schema_fuzz.py) see what the server accepts."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        body = ChatRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(body.pop("$defs", {}))
        components["ChatRequest"] = body
        request_body = {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/ChatRequest"}}}}
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                if (method, path.rsplit("/", 1)[-1]) in (("post", "completions"), ("put", "{conv_id}")):
                    operation["requestBody"] = request_body
        app.openapi_schema = schema
    return app.openapi_schema


def fingerprint_of(options: ServerOptions) -> str | None:
    """The server's system_fingerprint, or None (logged) when the files cannot be read: the model
    load then reports the real problem."""
    try:
        return system_fingerprint(*resolve_model_paths(options.model_dir, options.mmproj))
    # catching Exception: gguf-py raises plain exceptions on bad files: logged, and the model load reports the real problem
    except Exception as exc:
        log.warning("no system_fingerprint: %s", exc)
        return None


def request_need(req: ChatRequest) -> str:
    """What the request's answer needs to see of its images (boxes from a schema, text to read)."""
    fmt = req.response_format
    schema = req.json_schema
    if schema is None and fmt is not None:
        schema = fmt.json_schema.schema_ if fmt.json_schema is not None else fmt.schema_
    return image_need(last_user_text(template_messages(req)), schema)


def make_job(req: ChatRequest, gen: GenerationOptions, rendered: RenderedPrompt, deadline: float) -> Job:
    """The scheduler's view of a validated request; an unseeded one gets a random seed."""
    return Job(
        prompt_text=rendered.text,
        images=rendered.images,
        options=gen,
        seed=gen.seed if gen.seed is not None else secrets.randbits(32),
        deadline=deadline,
        channel=EventChannel(),
        starts_inside_think=rendered.starts_inside_think,
        logit_bias=req.token_bias,
        ignore_eos=req.ignore_eos,
        cache_prompt=req.cache_prompt,
        n=req.n,
    )


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers or None)


class DisconnectWatch:
    """Asks the server whether the client hung up, at most every `interval_s` seconds."""

    def __init__(self, request: Request, interval_s: float = DISCONNECT_POLL_S) -> None:
        self._request = request
        self._interval_s = interval_s
        self._next = time.monotonic() + interval_s

    async def gone(self, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now < self._next:
            return False
        self._next = now + self._interval_s
        return await self._request.is_disconnected()


async def next_event(job: Job, watch: DisconnectWatch, scheduler: Scheduler) -> Event:
    """The job's next event; a client that hung up meanwhile cancels the job (even while tokens flow)."""
    while True:
        try:
            event = await job.channel.get(timeout=DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            event = None
        if await watch.gone(force=event is None):
            scheduler.cancel(job)
            raise ApiError(499, "the client closed the connection", code="cancelled")
        if event is not None:
            return event


async def collect(job: Job, watch: DisconnectWatch, scheduler: Scheduler, meta: ResponseMeta, event: Event,
                  tools: bool = False, logprobs: bool = False) -> dict:
    parts: list[list[str]] = [[] for _ in range(job.n)]
    thoughts: list[list[str]] = [[] for _ in range(job.n)]
    entries: list[list[TokenLogprob]] = [[] for _ in range(job.n)]
    finished: dict[int, Finished] = {}
    while True:
        if isinstance(event, TextDelta):
            parts[event.index].append(event.text)
            thoughts[event.index].append(event.reasoning)
            entries[event.index].extend(event.logprobs)
        elif isinstance(event, Finished):
            entries[event.index].extend(event.logprobs)
            finished[event.index] = event
            if len(finished) == job.n:
                return completion_body(meta, [_choice("".join(parts[i]), finished[i], tools,
                                                      entries[i] if logprobs else None, "".join(thoughts[i]))
                                              for i in range(job.n)],
                                       all_choices([finished[i].stats for i in range(job.n)]))
        elif isinstance(event, Failed):
            raise event.error
        event = await next_event(job, watch, scheduler)


def _choice(text: str, end: Finished, tools: bool, logprobs: list[TokenLogprob] | None,
            reasoning: str = "") -> ChoiceResult:
    """`text` is the answer alone (a Thinking model's reasoning comes apart), so tool calls are parsed from it only."""
    content, calls = parse_calls(text, cut=end.finish_reason == "length") if tools else (text, [])
    return ChoiceResult(content, end.finish_reason, calls, logprobs, reasoning)


def all_choices(stats: list[GenerationStats]) -> GenerationStats:
    """One request's numbers over its choices: the prompt once, the completion tokens of all (as OpenAI)."""
    return replace(stats[0], generated_tokens=sum(s.generated_tokens for s in stats),
                   thinking_tokens=sum(s.thinking_tokens for s in stats))


async def stream_body(job: Job, meta: ResponseMeta, event: Event, include_usage: bool,
                      tools: bool = False, logprobs: bool = False) -> AsyncIterator[bytes]:
    """OpenAI's chunk sequence: role, content (or tool call) deltas, finish_reason per choice, [usage], [DONE].

    With `logprobs`, a token's entry rides on the first chunk its text appears in (text held back, such
    as a tool call's markup, carries its tokens to the next chunk; a stop string's go on the last one)."""
    for index in range(job.n):
        yield sse(chunk_body(meta, {"role": "assistant", "content": ""}, index=index))
    calls = [ToolCallStream() if tools else None for _ in range(job.n)]
    unsent: list[tuple[TokenLogprob, ...]] = [() for _ in range(job.n)]
    finished: list[GenerationStats] = []
    while True:
        if isinstance(event, TextDelta):
            i, stream = event.index, calls[event.index]
            unsent[i] += event.logprobs
            if event.reasoning:  # before the text: a delta's reasoning was produced first
                yield sse(chunk_body(meta, {"reasoning_content": event.reasoning}, None,
                                     unsent[i] if logprobs and not event.text else None, i))
                if not event.text:
                    unsent[i] = ()
            for delta in _deltas(stream, stream.feed(event.text) if stream else [event.text]):
                yield sse(chunk_body(meta, delta, None, unsent[i] if logprobs else None, i))
                unsent[i] = ()
        elif isinstance(event, Finished):
            i, stream, reason = event.index, calls[event.index], event.finish_reason
            unsent[i] += event.logprobs
            if stream is not None:
                for delta in _deltas(stream, stream.finish(cut=reason == "length")):
                    yield sse(chunk_body(meta, delta, None, unsent[i] if logprobs else None, i))
                    unsent[i] = ()
                reason = finish_with_calls(reason, stream.calls)
            yield sse(chunk_body(meta, {}, reason, unsent[i] if logprobs and unsent[i] else None, i))
            finished.append(event.stats)
            if len(finished) == job.n:
                if include_usage:
                    yield sse(usage_chunk_body(meta, all_choices(finished)))
                yield SSE_DONE
                return
        elif isinstance(event, Failed):
            yield sse(event.error.body())  # the openai client raises APIError on an "error" event
            return
        event = await job.channel.get()


def _deltas(stream: ToolCallStream | None, items: list[str | ToolCall]) -> list[dict[str, Any]]:
    """Content text and finished calls -> stream chunk deltas (calls numbered in order)."""
    out: list[dict[str, Any]] = []
    index = (stream.calls if stream is not None else 0) - sum(isinstance(i, ToolCall) for i in items)
    for item in items:
        if isinstance(item, ToolCall):
            out.extend(tool_call_deltas(index, item))
            index += 1
        elif item:
            out.append({"content": item})
    return out
