"""HTTP serving over one Engine: OpenAI-compatible completions and chat completions, Megatron's
``PUT /api``, health, Prometheus metrics, and the playground page at ``/``.

Concurrent requests are decoded together (continuous batching, ``mtnlg.serve.batcher``).
The event loop only checks, parses and streams, and tokenizes in a worker thread, so it keeps
answering (health, bad requests) while a batch runs. Before a body is read, the API key is
checked (every path but ``/health`` and the page at ``/``, whose own API calls carry the key) and
its size limited; the body's fields are range-checked (``protocol``), so only an internal failure
is a 500, and it fails only the request concerned.

Errors are JSON in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for
malformed or out-of-range requests, 401 without the right ``Authorization: Bearer`` key, 404
``model_not_found`` for another model's name, 413 for a body over the size limit. The routes'
work is in ``handlers``; metrics and access logs in ``metrics``.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, SimpleUser
from starlette.exceptions import HTTPException
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from mtnlg.generate.engine import Engine
from mtnlg.serve import handlers
from mtnlg.serve.handlers import APIError, ServerState
from mtnlg.serve.metrics import AccessLog, ServerMetrics, log_to_stderr
from mtnlg.serve.protocol import ChatCompletionRequest, CompletionRequest, MegatronRequest

API_KEY_ENV = "MTNLG_API_KEY"
MAX_BODY_BYTES = 1 << 20  # default limit of a request body (mtnlg serve --max-body-bytes)


# -- errors and auth -------------------------------------------------------------------------------


def _error(
    status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None
) -> JSONResponse:
    """OpenAI's error shape. The message may quote the request (a field name, a value): anything JSON
    cannot carry as UTF-8 (a lone surrogate) is escaped, so the error itself always serialises."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    param = None if param is None else param.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = _most_telling(exc.errors())
        loc = [str(p) for p in err.get("loc", ()) if p != "body" and _is_field(p)]
        if err.get("type") == "json_invalid":
            return _error(400, f"request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
        where = ".".join(loc) or "body"
        return _error(400, f"{where}: {err['msg']}", param=where)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        kind = "server_error" if exc.status >= 500 else "invalid_request_error"
        return _error(exc.status, exc.message, exc.param, kind, exc.code)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if exc.status_code == 413:
            detail = f"request body too large: at most {app.state.max_body_bytes} bytes (mtnlg serve --max-body-bytes)"
        return _error(exc.status_code, detail, kind="not_found" if exc.status_code == 404 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:  # a bug: still JSON, never plain text
        return _error(500, f"internal error: {type(exc).__name__}", kind="server_error")


def _is_field(part: object) -> bool:
    """A field name or list index in a pydantic error location (not the tag of a union's branch,
    such as ``list[...]`` or ``function-after[...]``)."""
    return isinstance(part, int) or str(part).isidentifier()


def _most_telling(errors: list) -> dict:
    """The error to report. A value that fails every branch of a union (``stop``: a string or a list)
    gets one error per branch; one that is not about the type (a list too long) says more than
    "should be a string"."""
    if not errors:
        return {"loc": (), "msg": "invalid request"}
    return next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0])


class _DeclaredSize:
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
                await _error(413, message)(scope, receive, send)
                return
        await self.app(scope, receive, send)


OPEN_PATHS = frozenset({"/health", "/"})  # everything else needs the key, the API docs and /metrics included


class _BearerKey(AuthenticationBackend):
    """Checks ``Authorization: Bearer KEY`` before the request body is read or parsed, comparing
    SHA-256 digests in constant time (neither the key's content nor its length leaks)."""

    def __init__(self, api_key: str) -> None:
        self.digest = hashlib.sha256(api_key.encode()).digest()

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        if conn.url.path in OPEN_PATHS:
            return None
        scheme, _, token = conn.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        if not hmac.compare_digest(given, self.digest) or scheme.lower() != "bearer":
            raise AuthenticationError("missing or wrong API key: send 'Authorization: Bearer <key>'")
        return AuthCredentials(["api"]), SimpleUser("client")


# -- the app ---------------------------------------------------------------------------------------


def create_app(
    engine_or_checkpoint: Engine | str | Path,
    api_key: str | None = None,
    model_name: str | None = None,
    quantize: str | None = None,
    max_batch_size: int = 8,
    batch_wait_s: float = 0.005,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The FastAPI app serving an engine (or a checkpoint directory, loaded here).

    ``api_key`` None serves without authentication; an empty key is refused (it would look like
    protection and be none)."""
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty: give a real key, or none to serve without authentication")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    return_freed_memory()
    if isinstance(engine_or_checkpoint, Engine):
        engine = engine_or_checkpoint
        name = model_name or "mtnlg"
    else:
        engine = Engine.from_checkpoint(engine_or_checkpoint, quantize=quantize, max_batch_size=max_batch_size)
        name = model_name or Path(engine_or_checkpoint).resolve().name
    metrics = ServerMetrics()
    server = ServerState(engine, name, batch_wait_s, metrics)
    metrics.watch(server.batcher)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.batcher.start()
        yield
        server.batcher.stop()

    app = FastAPI(title="mtnlg", lifespan=lifespan)
    app.state.server, app.state.metrics, app.state.max_body_bytes = server, metrics, max_body_bytes
    _install_error_handlers(app)
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=max_body_bytes)
    app.add_middleware(_DeclaredSize, max_body_bytes=max_body_bytes)
    if api_key is not None:
        app.add_middleware(AuthenticationMiddleware, backend=_BearerKey(api_key),
                           on_error=lambda _, exc: _error(401, str(exc)))
    app.add_middleware(AccessLog, metrics=metrics)  # added last: runs first, so refusals are counted too
    _add_routes(app, server, metrics)
    return app


PLAYGROUND = files("mtnlg.generate").joinpath("static", "playground.html")


def _add_routes(app: FastAPI, server: ServerState, metrics: ServerMetrics) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict:
        b = server.batcher
        stats = {"batches": b.batches, "largest_batch": b.largest_batch, "admitted": b.admitted}
        return {"status": "ok", "model": server.model_name, **stats}

    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        return metrics.response()

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "mtnlg"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request, body: CompletionRequest) -> JSONResponse | StreamingResponse:
        return await handlers.completion(server, request, body)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> JSONResponse | StreamingResponse:
        return await handlers.chat_completion(server, request, body)

    @app.put("/api")
    async def megatron(request: Request, body: MegatronRequest) -> dict:
        return await handlers.megatron(server, request, body)


def return_freed_memory() -> None:
    """Make glibc give large freed buffers back to the OS (a no-op elsewhere).

    glibc serves a request of more than its mmap threshold (128 KiB) with mmap, but raises the
    threshold (up to 32 MiB) whenever such a block is freed; from then on activations of varied
    sizes come from the heap, which fragments, and a server replaying the same requests kept
    growing by hundreds of MB. A fixed threshold (what ``MALLOC_MMAP_THRESHOLD_`` sets) stops that.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3  # malloc.h
    libc.mallopt(m_mmap_threshold, 128 * 1024)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, sock: socket.socket | None = None) -> None:
    """Run the app with uvicorn until interrupted (on ``sock`` if given: bound before the model loaded)."""
    import uvicorn

    log_to_stderr()  # one JSON line per request, instead of uvicorn's access lines
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False)
    uvicorn.Server(config).run(sockets=[sock] if sock is not None else None)
