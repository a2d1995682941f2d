"""What every request passes before a route sees it: the error shape, the ``Host`` check, the body's
read deadline and declared size, and the API key.

Errors are JSON in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` (``error``).
The ``Host`` check (``HostCheck``) stops DNS rebinding: a page on ``attacker.example`` whose name
the attacker re-points at 127.0.0.1 makes the visitor's browser send requests to a local server,
with the attacker's name in ``Host``; a server on loopback answers only its own names (or those
given with ``--allowed-host``), anything else gets 400. The key check and the router read the
same path (``scope["path"]``), never one rebuilt from the ``Host`` header.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Awaitable, Collection
from typing import TypeVar

from fastapi.responses import JSONResponse
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, SimpleUser
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

T = TypeVar("T")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # the names a loopback server answers by default
OPEN_PATHS = frozenset({"/health", "/"})  # everything else needs the key, the API docs and /metrics included


def error_response(
    status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """OpenAI's error shape. The message may quote the request (a field name, a value): anything JSON
    cannot carry as UTF-8 (a lone surrogate) is escaped, so the error itself always serialises."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    param = None if param is None else param.encode("utf-8", "backslashreplace").decode("utf-8")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def within(awaitable: Awaitable[T], seconds: float | None) -> T:
    """``await awaitable``, or ``asyncio.TimeoutError`` after ``seconds`` (None: no limit).

    Every request awaits its body (and then its disconnect) this way, so it is kept cheap: on
    Python >= 3.11 ``asyncio.timeout`` schedules one timer; ``asyncio.wait_for`` (3.10, and 3.11's
    own) also wraps the awaitable in a task, which costs a turn of the event loop even when the
    body has already arrived. On 3.10 the error is ``asyncio.TimeoutError``, not the builtin."""
    if seconds is None or not hasattr(asyncio, "timeout"):
        return await asyncio.wait_for(awaitable, seconds)
    async with asyncio.timeout(max(0.0, seconds)):
        return await awaitable


def host_name(host: str) -> str:
    """The name in a ``Host`` header, without its port: ``[::1]:8000`` -> ``[::1]``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class HostCheck:
    """Answers 400 to a request whose ``Host`` names none of ``allowed`` (a request without one,
    which only HTTP/1.0 allows and no browser sends, passes)."""

    def __init__(self, app: ASGIApp, allowed: Collection[str]) -> None:
        self.app, self.allowed = app, {host_name(h) for h in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"host")
            name = None if given is None else host_name(given.decode("latin-1"))
            if name is not None and name not in self.allowed:
                message = (f"Host {name!r} is not served here: this server answers {', '.join(sorted(self.allowed))} "
                           "(mtnlg serve --allowed-host NAME adds a name)")
                await error_response(400, message, code="host_not_allowed")(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyDeadline:
    """A request's body must arrive within ``seconds`` of its head, or the request gets 408 and the
    connection closes: a client that trickles its body holds no connection for longer. (The head's
    own deadline is the connection's: ``mtnlg.serve.connection``.)"""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline, done = time.monotonic() + self.seconds, False

        async def timed() -> Message:
            nonlocal done
            if done:
                return await receive()
            try:
                message = await within(receive(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                raise HTTPException(408, f"request body not received within {self.seconds:g} s "
                                         "(mtnlg serve --body-timeout)") from None
            done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed, send)


class DeclaredSize:
    """Refuses a body whose declared ``Content-Length`` exceeds the limit before reading any of it,
    with the API's JSON error. Starlette's ``RequestBodyLimitMiddleware`` (inside this one) counts the
    bytes of a body as they arrive, which covers chunked bodies, but answers a declared oversize in
    plain text."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            declared = dict(scope["headers"]).get(b"content-length", b"0")
            if not declared.isdigit() or int(declared) > self.max_body_bytes:
                message = f"request body too large: at most {self.max_body_bytes} bytes (mtnlg serve --max-body-bytes)"
                await error_response(413, message)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BearerKey(AuthenticationBackend):
    """Checks ``Authorization: Bearer KEY`` before the request body is read or parsed, comparing
    SHA-256 digests in constant time (neither the key's content nor its length leaks). The path is
    the router's (``scope["path"]``): one rebuilt from ``Host`` could be made to read ``/health``."""

    def __init__(self, api_key: str) -> None:
        self.digest = hashlib.sha256(api_key.encode()).digest()

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        if conn.scope["path"] in OPEN_PATHS:
            return None
        scheme, _, token = conn.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        if not hmac.compare_digest(given, self.digest) or scheme.lower() != "bearer":
            raise AuthenticationError("missing or wrong API key: send 'Authorization: Bearer <key>'")
        return AuthCredentials(["api"]), SimpleUser("client")
