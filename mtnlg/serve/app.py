"""HTTP serving over one Engine: OpenAI-compatible completions and chat completions, Megatron's
``PUT /api``, the token inspector (``POST /v1/inspect``), health, Prometheus metrics, and the
playground page at ``/``.

Concurrent requests are decoded together (continuous batching, ``mtnlg.serve.batcher``).
The event loop only checks, parses and streams, and tokenizes in a worker thread, so it keeps
answering (health, bad requests) while a batch runs. Before a body is read, the API key is
checked (every path but ``/health`` and the page at ``/``, whose own API calls carry the key) and
its size limited; the body's fields are range-checked (``protocol``), so only an internal failure
is a 500, and it fails only the request concerned.

Errors are JSON in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for
malformed HTTP, out-of-range requests or a foreign ``Host`` on loopback, 401 without the right
``Authorization: Bearer`` key, 404 ``model_not_found`` for another model's name, 408 for a head
or body not received in time, 413 for a body over the size limit, 503 with ``Retry-After`` when
the queue of waiting sequences or the connections are full, 504 past ``request_timeout_s``. A
request's sequences stop as soon as its client disconnects, streamed or not. The routes' work is
in ``handlers``; the checks before them in ``middleware``; the connection's deadlines in
``connection``; metrics and access logs in ``metrics``.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from mtnlg.generate.engine import Engine
from mtnlg.serve import handlers, inspect
from mtnlg.serve.connection import ConnectionLimits, uvicorn_config
from mtnlg.serve.handlers import APIError, ServerState
from mtnlg.serve.inspect import InspectRequest
from mtnlg.serve.metrics import AccessLog, ServerMetrics, log_to_stderr
from mtnlg.serve.middleware import LOOPBACK_HOSTS, BearerKey, BodyDeadline, DeclaredSize, HostCheck, error_response
from mtnlg.serve.protocol import ChatCompletionRequest, CompletionRequest, MegatronRequest
from mtnlg.util.memory import return_freed_memory

API_KEY_ENV = "MTNLG_API_KEY"
MAX_BODY_BYTES = 1 << 20  # default limit of a request body (mtnlg serve --max-body-bytes)
MAX_QUEUED_SEQUENCES = 256  # default bound of the sequences waiting for a row (--max-queued-sequences)


# -- errors ----------------------------------------------------------------------------------------


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = _most_telling(exc.errors())
        loc = [str(p) for p in err.get("loc", ()) if p != "body" and _is_field(p)]
        if err.get("type") == "json_invalid":
            return error_response(400, f"request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
        where = ".".join(loc) or "body"
        return error_response(400, f"{where}: {err['msg']}", param=where)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        kind = "server_error" if exc.status >= 500 else "invalid_request_error"
        return error_response(exc.status, exc.message, exc.param, kind, exc.code, exc.headers)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if exc.status_code == 413:
            detail = f"request body too large: at most {app.state.max_body_bytes} bytes (mtnlg serve --max-body-bytes)"
        closing = {"Connection": "close"} if exc.status_code == 408 else None  # the body may still be on its way
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, detail, kind=kind, code="timeout" if closing else None, headers=closing)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:  # a bug: still JSON, never plain text
        return error_response(500, f"internal error: {type(exc).__name__}", kind="server_error")


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


# -- the app ---------------------------------------------------------------------------------------


def create_app(
    engine_or_checkpoint: Engine | str | Path,
    api_key: str | None = None,
    model_name: str | None = None,
    quantize: str | None = None,
    max_batch_size: int = 8,
    batch_wait_s: float = 0.005,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_queued_sequences: int | None = MAX_QUEUED_SEQUENCES,
    request_timeout_s: float | None = None,
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS,
    limits: ConnectionLimits | None = None,
) -> FastAPI:
    """The FastAPI app serving an engine (or a checkpoint directory, loaded here).

    ``api_key`` None serves without authentication; an empty key is refused (it would look like
    protection and be none). ``allowed_hosts`` None answers any ``Host``; ``limits`` are the
    connection's, which ``serve`` (uvicorn) applies."""
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
    server = ServerState(engine, name, batch_wait_s, metrics, max_queued_sequences, request_timeout_s)
    metrics.watch(server.batcher)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.batcher.start()
        yield
        server.batcher.stop()

    app = FastAPI(title="mtnlg", lifespan=lifespan)
    app.state.server, app.state.metrics, app.state.max_body_bytes = server, metrics, max_body_bytes
    app.state.limits = limits or ConnectionLimits()
    _install_error_handlers(app)
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=max_body_bytes)
    app.add_middleware(BodyDeadline, seconds=app.state.limits.body_timeout_s)
    app.add_middleware(DeclaredSize, max_body_bytes=max_body_bytes)
    if api_key is not None:
        app.add_middleware(AuthenticationMiddleware, backend=BearerKey(api_key),
                           on_error=lambda _, exc: error_response(401, str(exc)))
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=allowed_hosts)
    app.add_middleware(AccessLog, metrics=metrics)  # added last: runs first, so refusals are counted too
    _add_routes(app, server, metrics)
    return app


PLAYGROUND = files("mtnlg.serve").joinpath("static", "playground.html")


def _add_routes(app: FastAPI, server: ServerState, metrics: ServerMetrics) -> None:
    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    @app.head("/health", include_in_schema=False)  # what load balancers and uptime checks send
    @app.get("/health")
    async def health() -> dict:
        b = server.batcher
        stats = {"batches": b.batches, "largest_batch": b.largest_batch, "admitted": b.admitted,
                 "running": b.running, "waiting": b.waiting()}
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

    @app.post("/v1/inspect")
    async def inspector(body: InspectRequest) -> dict:
        return await inspect.inspect(server, body)

    @app.put("/api")
    async def megatron(request: Request, body: MegatronRequest) -> dict:
        return await handlers.megatron(server, request, body)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, sock: socket.socket | None = None) -> None:
    """Run the app with uvicorn until interrupted (on ``sock`` if given: bound before the model loaded)."""
    import uvicorn

    log_to_stderr()  # one JSON line per request, instead of uvicorn's access lines
    config = uvicorn_config(app, app.state.limits, host=host, port=port, log_level="info", access_log=False)
    uvicorn.Server(config).run(sockets=[sock] if sock is not None else None)
