"""Saved conversations over HTTP: a slot's KV cache to a file and back, by id.

    PUT    /v1/conversations/{id}          {"messages": [...]}  evaluate (or find) them in a slot, save it
    POST   /v1/conversations/{id}/restore  load the file into a free slot; returns the messages
    GET    /v1/conversations               the saved ids
    DELETE /v1/conversations/{id}

(also without the /v1 prefix, as every API route: app.API_PREFIXES).

The file format is `VisionChat.save`'s, so either side can open the other's files.
After a restore, a chat completion that repeats the returned messages starts
where the saved conversation ended (its usage shows them as cached tokens).
Images are kept in the file as the data: URIs the client sent, so a restored
conversation can be continued by a client that no longer has them.

Writing to the server's disk is an admin action: with `--admin-key` these
routes need that key; with only `--api-key` they are refused; a server with
neither (loopback, one user) leaves them open. Files live in `--conversation-dir`.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from edge_common.errors import OutputError
from edge_runtime.core.engine import Engine
from edge_runtime.core.kv_state import Unit
from ..errors import SavedConversationError
from edge_runtime.chat.saved_conversation import (
    SUFFIX,
    SavedConversation,
    StateFingerprint,
    map_parts,
    read_conversation,
    write_conversation,
)
from .config import ServerOptions
from .errors import ApiError, bad_request, from_exception
from .prompting import RenderedPrompt, render_prompt
from .schemas import parse_chat_request, template_messages
from .security import ImagePolicy, bearer_token
from .slots import Candidate, Slot, choose_slot

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # fullmatch: "$" would accept a trailing newline


@dataclass
class Snapshot:
    units: list[Unit]
    kv: bytearray
    reused_tokens: int
    depends_on: StateFingerprint
    n_ctx: int
    model_files: dict[str, str | None]


def require_admin(request: Request, options: ServerOptions) -> None:
    """403 unless the caller may write and read the server's saved conversations."""
    if options.admin_key:
        if not hmac.compare_digest(bearer_token(request.scope.get("headers", [])), options.admin_key.encode()):
            raise ApiError(403, "saving and restoring conversations needs the admin key "
                           "('Authorization: Bearer <admin key>', set with --admin-key)",
                           "permission_error", None, "admin_key_required")
    elif options.api_key:
        raise ApiError(403, "saving and restoring conversations is off on a server with --api-key "
                       "but no --admin-key; start it with --admin-key (EDGE_ADMIN_KEY)",
                       "permission_error", None, "admin_key_required")


def conversation_path(options: ServerOptions, conv_id: str) -> Path:
    if options.conversation_dir is None:
        raise ApiError(404, "this server keeps no conversations; start it with --conversation-dir DIR",
                       "not_found_error", None, "conversations_disabled")
    if not _ID.fullmatch(conv_id):
        raise bad_request(f"conversation id {conv_id[:80]!r} must be 1-64 letters, digits, '_' or '-'", "id")
    return Path(options.conversation_dir) / f"{conv_id}{SUFFIX}"


def stored_messages(messages: list[dict], rendered: RenderedPrompt) -> list[dict]:
    """Request messages with each image_url part replaced by its digest, size and data: URI."""
    images = iter(rendered.images)  # in prompt order, as split_messages found them

    def part(p: Any) -> Any:
        if not (isinstance(p, dict) and p.get("type") == "image_url"):
            return p
        img, url = next(images), p["image_url"]["url"]
        return {"type": "image", "digest": img.digest, "width": img.width, "height": img.height,
                **({"url": url} if url.startswith("data:") else {})}

    return map_parts(messages, part)


def client_messages(messages: list[dict]) -> list[dict]:
    """Stored messages -> what a client sends again: image parts with a data: URI become image_url parts."""
    return map_parts(messages, _client_part)


def _client_part(part: Any) -> Any:
    if isinstance(part, dict) and part.get("type") == "image":
        if "url" in part:
            return {"type": "image_url", "image_url": {"url": part["url"]}}
        image = part.get("image")  # restored by messages_from_json: a pixel-less ImageInput
        return {"type": "image", "digest": getattr(image, "digest", part.get("digest")),
                "width": getattr(image, "width", part.get("width")), "height": getattr(image, "height", part.get("height"))}
    return part


# ---------------------------------------------------------------- work in the scheduler thread


def save_slot(rendered: RenderedPrompt, chat_template: str) -> Callable[[Engine, list[Slot]], Snapshot]:
    """Evaluate the messages in the free slot sharing most of them, then export that slot.

    Tasks are partials of module functions: they cross into the engine process pickled."""
    return functools.partial(_save_slot, rendered, chat_template)


def _save_slot(rendered: RenderedPrompt, chat_template: str, engine: Engine, free: list[Slot]) -> Snapshot:
    if not free:
        raise _slots_busy()
    with engine.tokenize(rendered.text, rendered.images) as prompt:
        engine.check_fits(prompt.n_tokens, 0)
        candidates = [Candidate(s.seq_id, engine.seq_state(s.seq_id).units, s.last_used) for s in free]
        seq_id, _ = choose_slot(candidates, prompt.units)
        pre = engine.prefill(prompt, seq_id)
    _touch(free, seq_id)
    units, kv = engine.export_seq(seq_id)
    files = {"model": str(engine.model_path.resolve()),
             "mmproj": str(engine.mmproj_path.resolve()) if engine.mmproj_path else None}
    return Snapshot(units, kv, pre.reused_tokens, engine.fingerprint(chat_template), engine.n_ctx_seq, files)


def restore_slot(conv: SavedConversation, source: str, chat_template: str) -> Callable[[Engine, list[Slot]], int]:
    """Load the cells into a free slot: an empty one if any, else the least recently used.

    The fingerprint is checked before any slot is touched; cells llama.cpp refuses leave the
    chosen slot holding what it held."""
    return functools.partial(_restore_slot, conv, source, chat_template)


def _restore_slot(conv: SavedConversation, source: str, chat_template: str, engine: Engine, free: list[Slot]) -> int:
    conv.check_fits(engine.fingerprint(chat_template), engine.n_ctx_seq, source)
    if not free:
        raise _slots_busy()
    slot = min(free, key=lambda s: (engine.seq_state(s.seq_id).n_tokens > 0, s.last_used))
    engine.import_seq(slot.seq_id, conv.units, conv.kv)
    _touch(free, slot.seq_id)
    return slot.seq_id


def _touch(slots: list[Slot], seq_id: int) -> None:
    for slot in slots:
        if slot.seq_id == seq_id:
            slot.last_used = time.monotonic()


def _slots_busy() -> ApiError:
    return ApiError(503, "every slot is busy answering; retry when one is free", "server_error", None,
                    "slots_busy", {"Retry-After": "2"})


# ---------------------------------------------------------------- routes


def add_conversation_routes(router: APIRouter, scheduler: Any, options: ServerOptions, policy: ImagePolicy) -> None:
    async def call(fn: Any) -> Any:
        return await asyncio.wrap_future(scheduler.run_exclusive(fn))

    @router.get("/conversations")
    async def list_conversations(request: Request) -> dict[str, Any]:
        require_admin(request, options)
        root = conversation_path(options, "x").parent
        data = []
        for p in sorted(root.glob(f"*{SUFFIX}")):
            try:
                st = p.stat()
            except OSError:  # a dangling symlink or a file removed meanwhile: not a conversation
                continue
            if _ID.fullmatch(p.name[: -len(SUFFIX)]) and stat.S_ISREG(st.st_mode):
                data.append({"id": p.name[: -len(SUFFIX)], "bytes": st.st_size, "modified": int(st.st_mtime)})
        return {"object": "list", "data": data}

    @router.put("/conversations/{conv_id}")
    async def save(conv_id: str, request: Request) -> dict[str, Any]:
        require_admin(request, options)
        path = conversation_path(options, conv_id)
        scheduler.require_ready()
        try:
            req = parse_chat_request(await request.body())
            messages = template_messages(req)
            rendered = await run_in_threadpool(render_prompt, scheduler.prompt_format, messages, policy.load,
                                               policy.load_video)
        # catching Exception: the route's door: from_exception gives each refusal its 4xx, anything else a logged 500
        except Exception as exc:
            raise from_exception(exc) from None
        try:
            snap: Snapshot = await call(save_slot(rendered, scheduler.prompt_format.template.source))
        # catching Exception: the engine's reply: from_exception gives each refusal its 4xx, anything else a logged 500
        except Exception as exc:
            raise from_exception(exc) from None
        conv = SavedConversation(snap.depends_on, snap.units, stored_messages(messages, rendered), snap.kv,
                                 n_ctx=snap.n_ctx, model_files=snap.model_files)
        try:
            size = await run_in_threadpool(write_conversation, path, conv)
        except OutputError as exc:  # a full or read-only --conversation-dir: our fault, said plainly
            raise ApiError(507, str(exc).replace(str(path), f"conversation {conv_id!r} in --conversation-dir"),
                           "server_error", None, "conversation_not_written") from None
        return {"id": conv_id, "object": "conversation", "bytes": size, "tokens": conv.n_tokens,
                "cached_tokens": snap.reused_tokens}

    @router.post("/conversations/{conv_id}/restore")
    async def restore(conv_id: str, request: Request) -> dict[str, Any]:
        require_admin(request, options)
        path = conversation_path(options, conv_id)
        scheduler.require_ready()
        if not path.is_file():
            raise ApiError(404, f"no saved conversation {conv_id!r}", "not_found_error", "id", "conversation_not_found")
        try:
            conv = await run_in_threadpool(read_conversation, path)
            await call(restore_slot(conv, f"conversation {conv_id!r}", scheduler.prompt_format.template.source))
        except SavedConversationError as exc:
            raise ApiError(409, str(exc).replace(str(path), f"conversation {conv_id!r}"), "invalid_request_error",
                           None, "conversation_incompatible") from None
        # catching Exception: the engine's reply: from_exception gives each refusal its 4xx, anything else a logged 500
        except Exception as exc:
            raise from_exception(exc) from None
        return {"id": conv_id, "object": "conversation", "tokens": conv.n_tokens,
                "messages": client_messages(conv.messages)}

    @router.delete("/conversations/{conv_id}")
    async def delete(conv_id: str, request: Request) -> dict[str, Any]:
        require_admin(request, options)
        path = conversation_path(options, conv_id)
        if not path.is_file():
            raise ApiError(404, f"no saved conversation {conv_id!r}", "not_found_error", "id", "conversation_not_found")
        path.unlink()
        return {"id": conv_id, "object": "conversation", "deleted": True}
