"""What a client may make the server do: authentication, body limits, image sources.

The server is safe by default: without options it only accepts images inside
the request (data: URIs), never fetches a URL, never opens a local file, and
reads at most `max_body_bytes` of any request before refusing it.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import os
import re
import stat
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import httpx

from edge_runtime.vision.images import ImageError, ImageLimits
from edge_runtime.chat.messages import image_input
from edge_runtime.vision.image_input import ImageInput
from edge_runtime.vision.video import VideoInput, VideoOptions, load_video
from .config import is_origin
from .errors import ApiError, bad_request

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*):", re.IGNORECASE)


# ---------------------------------------------------------------- ASGI middlewares


async def send_error(send: Send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class AuthMiddleware:
    """Bearer API key on every route except the open ones, compared in constant time.

    Open: /health (and /v1/health), and the chat page (`/`, `/static/...`: files without data; the page
    asks for the key). The admin key, a superset of the API key, is accepted too.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, admin_key: str | None = None,
                 open_paths: frozenset[str] = frozenset({"/health", "/v1/health", "/"}), open_prefix: str = "/static/") -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.admin = admin_key.encode() if admin_key else None
        self.open_paths = open_paths
        self.open_prefix = open_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (scope["type"] != "http" or self.key is None or path in self.open_paths
                or path.startswith(self.open_prefix)):
            await self.app(scope, receive, send)
            return
        given = bearer_token(scope.get("headers", []))
        admin = self.admin is not None and hmac.compare_digest(given, self.admin)
        if not (hmac.compare_digest(given, self.key) or admin):
            await send_error(send, ApiError(
                401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                "authentication_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"}))
            return
        await self.app(scope, receive, send)


def bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes:
    for name, value in headers:
        if name.lower() == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].strip()
    return b""


class BodyLimitMiddleware:
    """Reads a request body up to `max_bytes` before the app sees it; larger ones get 413.

    The body is buffered here (it is needed whole to parse JSON anyway) and
    replayed; later receive() calls reach the client, so disconnects still show.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope.get("headers", []))
        if declared is not None and declared > self.max_bytes:
            await send_error(send, self._too_large(declared))
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await send_error(send, self._too_large(size))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self, size: int) -> ApiError:
        return ApiError(413, f"the request body ({size} bytes or more) exceeds the server's limit of "
                        f"{self.max_bytes} bytes (--max-body-bytes)", "invalid_request_error", None,
                        "request_too_large", {"Connection": "close"})


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class BrowserGuardMiddleware:
    """What a web page could make a visitor's browser send to a local server is refused.

    - A `Host` that is not a loopback name, not listed (`--allowed-host`) and not an
      IP literal on a non-loopback bind is 403: a DNS-rebinding page sends its own name.
    - An `Origin` other than the server's own and not listed (`--cors-origin`) is 403,
      preflights included; listed origins get CORS headers from Starlette's middleware.
    - POST/PUT/PATCH bodies must be `application/json` (415): a page can send text/plain
      or form bodies to any address without a preflight. (Empty bodies carry no type.)
    """

    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...] = (), cors_origins: tuple[str, ...] = (),
                 loopback_bind: bool = True) -> None:
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.hosts = frozenset(h.lower().rstrip(".") for h in allowed_hosts)
        self.any_origin = "*" in cors_origins
        self.origins = frozenset(o.lower().rstrip("/") for o in cors_origins)
        self.loopback_bind = loopback_bind

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self.check(scope.get("method", "GET"), dict(_headers(scope)))
        if error is not None:
            await send_error(send, error)
            return
        await self.app(scope, receive, send)

    def check(self, method: str, headers: dict[str, str]) -> ApiError | None:
        host = headers.get("host")
        if host is not None and not self.host_allowed(split_host(host)[0]):
            return ApiError(403, f"Host {host!r} is not allowed: this server answers loopback names only "
                            f"(start edge-serve with --allowed-host {split_host(host)[0]} to accept it)",
                            "invalid_request_error", None, "host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin, host):
            return ApiError(403, f"cross-origin request from {origin!r} refused ({origin_hint(origin)})",
                            "invalid_request_error", None, "origin_not_allowed")
        bodyless = headers.get("content-length", "0").strip() == "0" and "transfer-encoding" not in headers
        if method in ("POST", "PUT", "PATCH") and not bodyless:  # an empty POST (restore) has nothing to label
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                shown = media or "none"
                return ApiError(415, f"request bodies must be JSON: send 'Content-Type: application/json' "
                                f"(got {shown})", "invalid_request_error", None, "unsupported_media_type")
        return None

    def host_allowed(self, name: str) -> bool:
        name = name.lower().rstrip(".")
        if self.any_host or name in self.hosts or name == "localhost" or name.endswith(".localhost"):
            return True
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return False  # a DNS name: only listed ones (a rebinding page sends its own)
        return address.is_loopback or not self.loopback_bind

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        origin = origin.lower().rstrip("/")
        if self.any_origin or origin in self.origins:
            return True
        parsed = urllib.parse.urlsplit(origin)  # same origin: the page this server itself served
        return host is not None and parsed.scheme in ("http", "https") and parsed.netloc == host.lower()


def origin_hint(origin: str) -> str:
    """What to start edge-serve with to let pages from `origin` in: never a value --cors-origin refuses.

    Pages opened from file://, sandboxed frames and browser extensions send origins that are no
    scheme://host[:port] ('null', 'chrome-extension://...'): they can only be allowed with '*'."""
    if is_origin(origin):
        return f"start edge-serve with --cors-origin {origin} to allow pages from it"
    return ("pages opened from file://, sandboxed frames and extensions send an origin that cannot be listed; "
            "serve the page over http(s) and list that origin with --cors-origin, or allow every origin with "
            "--cors-origin '*'")


def split_host(value: str) -> tuple[str, str]:
    """'[::1]:8080' -> ('::1', '8080'); 'localhost' -> ('localhost', '')."""
    value = value.strip()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        return name, rest.lstrip(":")
    name, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    return name, port


def _headers(scope: Scope) -> list[tuple[str, str]]:
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers", [])]


# ---------------------------------------------------------------- image sources


@dataclass(frozen=True)
class ImagePolicy:
    """Which image URLs a request may use, and how many bytes each may have."""

    max_image_bytes: int
    allow_remote: bool = False
    local_root: Path | None = None
    fetch_timeout_s: float = 10.0
    # (detail, images of the message, need) -> the budget the loaded engine gives an image (None before it is loaded)
    planner: Callable[[str, int, str], Any] | None = None
    default_detail: str = "auto"

    video: VideoOptions = VideoOptions(max_bytes=64 * 1024 * 1024)

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_image_bytes)

    def load(self, src: Any, name: str, detail: str | None = None, share: int = 1, need: str = "") -> ImageInput:
        """An image_url value -> ImageInput (resized for its detail level, the images sharing its
        message and what the answer needs to see), refusing sources the server was not told to allow."""
        if isinstance(src, ImageInput):  # a digest reference (schemas.ImageRefPart): no pixels to fetch or plan
            return src
        plan = self.planner(detail or self.default_detail, share, need) if self.planner is not None else None
        try:
            return image_input(self._source(src, name, self.max_image_bytes, "image"), name, self.limits, plan)
        except ImageError as exc:
            raise bad_request(str(exc), name, "invalid_image") from None

    def loader(self, need: str) -> Callable[[Any, str, str | None, int], ImageInput]:
        """`load` for the images of one request whose answer has `need` (image_budget.image_need)."""
        return lambda src, name, detail, share: self.load(src, name, detail, share, need)

    def load_video(self, src: Any, name: str) -> VideoInput:
        """A video_url value -> VideoInput, under the same source policy as images."""
        try:
            return load_video(self._source(src, name, self.video.max_bytes, "video"), name, self.video)
        except ImageError as exc:  # VideoError included
            raise bad_request(str(exc), name, "invalid_video") from None

    def _source(self, src: Any, name: str, max_bytes: int, what: str) -> str | bytes:
        """The data URI itself, or the bytes of an allowed remote URL or local file; refusals speak of
        `what` ("image" or "video")."""
        if not isinstance(src, str):
            raise bad_request(f"{name}: the url must be a string", name)
        kind = source_kind(src)
        if kind == "data":
            size = data_uri_size(src)
            if size > max_bytes:
                raise _too_large(name, size, max_bytes, what)
            return src
        if kind == "remote":
            if not self.allow_remote:
                raise ApiError(400, f"{name}: remote {what} URLs are disabled on this server; send the {what} as a "
                               "data: URI (or start edge-serve with --allow-remote-images, which covers videos too)",
                               "invalid_request_error", name, "remote_images_disabled")
            return fetch_remote(src, max_bytes, self.fetch_timeout_s, name, what)
        if kind == "local":
            if self.local_root is None:
                raise ApiError(400, f"{name}: local file paths are disabled on this server; send the {what} as a "
                               "data: URI (or start edge-serve with --allow-local-dir DIR)",
                               "invalid_request_error", name, "local_images_disabled")
            path = confine_path(self.local_root, local_path(src, name), name, what)
            return read_capped(path, max_bytes, name, what)
        raise bad_request(f"{name}: unsupported {what} URL scheme in {src[:40]!r}; use a data: URI", name,
                          "unsupported_image_url")


def source_kind(url: str) -> str:
    """'data', 'remote' (http/https), 'local' (file:// or a bare path) or 'other'."""
    match = _SCHEME.match(url)
    if match is None or len(match.group(1)) == 1:  # no scheme (a one-letter one is a Windows drive)
        return "local"
    scheme = match.group(1).lower()
    return {"data": "data", "http": "remote", "https": "remote", "file": "local"}.get(scheme, "other")


def data_uri_size(uri: str) -> int:
    """Decoded bytes of a data: URI, estimated without decoding (base64: 3 bytes per 4 chars)."""
    header, _, payload = uri.partition(",")
    return len(payload) * 3 // 4 if ";base64" in header.lower() else len(payload)


def local_path(url: str, name: str) -> str:
    if url[:7].lower() != "file://":
        return url
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise bad_request(f"{name}: file:// URLs must not name a host", name, "path_not_allowed")
    return urllib.parse.unquote(parsed.path)


def confine_path(root: Path, raw: str, name: str = "image", what: str = "image") -> Path:
    """`raw` resolved inside `root`, or a 400: no '..', no absolute path elsewhere, no symlink out.

    Containment is checked before existence, so refusals say nothing about files outside root.
    """
    if "\x00" in raw:
        raise bad_request(f"{name}: invalid path", name, "path_not_allowed")
    lexical_root, root = Path(os.path.abspath(root)), Path(root).resolve()
    given = Path(raw)
    if ".." in given.parts:
        raise bad_request(f"{name}: '..' is not allowed in {what} paths", name, "path_not_allowed")
    candidate = given if given.is_absolute() else lexical_root / given
    outside = ApiError(400, f"{name}: the path is outside the directory this server may read "
                       "(--allow-local-dir)", "invalid_request_error", name, "path_not_allowed")
    lexical = Path(os.path.normpath(candidate))
    if not (_inside(lexical, lexical_root) or _inside(lexical, root)):
        raise outside
    resolved = candidate.resolve()  # follows symlinks: a link pointing out is caught here
    if not _inside(resolved, root):
        raise outside
    if not resolved.is_file():
        raise bad_request(f"{name}: no such {what} file in the allowed directory", name, "image_not_found")
    return resolved


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def read_capped(path: Path, max_bytes: int, name: str, what: str = "image") -> bytes:
    """Read a regular file of at most max_bytes; O_NOFOLLOW so a link swapped in now is not followed."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise bad_request(f"{name}: cannot open the {what} file ({exc.strerror})", name, "image_not_found") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise bad_request(f"{name}: not a regular file", name, "image_not_found")
        if info.st_size > max_bytes:
            raise _too_large(name, info.st_size, max_bytes, what)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _too_large(name, len(data), max_bytes, what)
    return data


def fetch_remote(url: str, max_bytes: int, timeout_s: float, name: str, what: str = "image") -> bytes:
    """GET an image (or video) with a byte cap enforced while streaming (a lying Content-Length changes nothing)."""
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=True, max_redirects=3) as client:
            with client.stream("GET", url, headers={"Accept": f"{what}/*"}) as response:
                if response.status_code != 200:
                    raise bad_request(f"{name}: fetching the {what} returned HTTP {response.status_code}", name,
                                      "image_fetch_failed")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise _too_large(name, int(declared), max_bytes, what)
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > max_bytes:
                        raise _too_large(name, len(data), max_bytes, what)
                return bytes(data)
    except httpx.HTTPError as exc:
        raise bad_request(f"{name}: could not fetch the {what} ({type(exc).__name__}: {exc})", name,
                          "image_fetch_failed") from None


def _too_large(name: str, size: int, max_bytes: int, what: str = "image") -> ApiError:
    limit = "--max-image-bytes" if what == "image" else "edge-serve's limit for videos"
    return bad_request(f"{name}: the {what} has {size} bytes or more, over the limit of {max_bytes} "
                       f"({limit})", name, f"{what}_too_large")
