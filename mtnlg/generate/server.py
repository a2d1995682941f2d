"""HTTP serving over one Engine: OpenAI-compatible completions, Megatron's ``PUT /api``, health.

Concurrent requests are decoded together (continuous batching, ``mtnlg.generate.batcher``).
The event loop only checks, parses and streams, and tokenizes in a worker thread, so it keeps
answering (health, bad requests) while a batch runs. Before a body is read, the API key is
checked (every path but ``/health``) and its size limited; the body's fields are range-checked
(``protocol``), so only an internal failure is a 500, and it fails only the request concerned.

Errors are JSON in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for
malformed or out-of-range requests, 401 without the right ``Authorization: Bearer`` key, 404
``model_not_found`` for another model's name, 413 for a body over the size limit.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import hashlib
import hmac
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, SimpleUser
from starlette.exceptions import HTTPException
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from mtnlg.generate.batcher import Batcher, Job
from mtnlg.generate.engine import Completion, Engine, SamplingParams, TokenEvent
from mtnlg.generate.engine import Request as EngineRequest
from mtnlg.generate.protocol import CompletionRequest, MegatronRequest
from mtnlg.generate.sequence import LIMITS

API_KEY_ENV = "MTNLG_API_KEY"
MAX_SEQUENCES = 64  # prompts x n in one request
_API_NAMES = {"max_new_tokens": "max_tokens", "ignore_eod": "ignore_eos", "stop": "stop"}
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


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
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


OPEN_PATHS = frozenset({"/health"})  # everything else needs the key, the API docs included


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


# -- request handling ------------------------------------------------------------------------------


class _Server:
    """The state behind the routes: engine, batcher, model name."""

    def __init__(self, engine: Engine, model_name: str, batch_wait_s: float) -> None:
        self.engine, self.model_name = engine, model_name
        self.batcher = Batcher(engine, batch_wait_s)
        self.created = int(time.time())

    async def build(self, prompts: Sequence[str | list[int]], params: list[SamplingParams]) -> list[EngineRequest]:
        """Validated engine requests, prompt-major. The count is checked before anything is tokenized;
        each prompt is tokenized once (not once per choice), in a worker thread, so the event loop
        keeps answering meanwhile."""
        if len(prompts) * len(params) > MAX_SEQUENCES:
            raise APIError(400, f"{len(prompts)} prompts x n={len(params)} sequences requested; "
                                f"at most {MAX_SEQUENCES} per request", param="n")
        try:
            return await asyncio.to_thread(self._requests, prompts, params)
        except ValueError as exc:  # messages start with the field: SamplingParams' name, or the prompt's
            field = str(exc).split(" ", 1)[0]
            raise APIError(400, str(exc), param=_API_NAMES.get(field, field if field in LIMITS else "prompt")) from None

    def _requests(self, prompts: Sequence[str | list[int]], params: list[SamplingParams]) -> list[EngineRequest]:
        out = []
        for prompt in prompts:
            first = self.engine.request(prompt, params[0])
            out += [first] + [self.engine.request(first.prompt, sp) for sp in params[1:]]
        return out

    async def collect(self, job: Job) -> list[Completion]:
        out = [Completion(r.prompt) for r in job.requests]
        async for i, event in self.events(job):
            out[i].add(event)
        return out

    async def events(self, job: Job) -> AsyncIterator[tuple[int, TokenEvent]]:
        """A job's events until all its sequences finish; stops the job if the consumer leaves."""
        remaining = len(job.requests)
        try:
            while remaining:
                for item in await job.events.get():
                    if item[1].finish_reason == "error":
                        raise APIError(500, f"generation failed: {item[1].error}")
                    remaining -= item[1].finish_reason is not None
                    yield item
        finally:
            job.stopped.set()

    def check(self, body: CompletionRequest) -> None:
        """What the body's own validation cannot know: the served model, the options not implemented."""
        if body.model and body.model != self.model_name:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves "
                                f"'{self.model_name}' (GET /v1/models)", param="model", code="model_not_found")
        refused = body.unsupported()
        if refused is not None:
            raise APIError(400, refused[1], param=refused[0])

    def token_strings(self, ids: list[int]) -> list[str]:
        tok = self.engine.tokenizer
        return [tok.token_str(i) if tok is not None else "" for i in ids]

    def openai_logprobs(self, tokens: list[int], logprobs: list[float] | None, tops: list[dict] | None) -> dict:
        strs = self.token_strings(tokens)
        offsets = [sum(len(s) for s in strs[:i]) for i in range(len(strs))]
        top = [{self.token_strings([t])[0]: v for t, v in d.items()} for d in tops or []]
        return {"tokens": strs, "token_logprobs": logprobs or [], "top_logprobs": top, "text_offset": offsets}


def _completion_params(body: CompletionRequest) -> list[SamplingParams]:
    """One SamplingParams per choice; choice j of a seeded request uses seed + j."""
    base = SamplingParams(
        max_new_tokens=body.max_tokens,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        repetition_penalty=body.repetition_penalty,
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        logprobs=body.logprobs,
        ignore_eod=body.ignore_eos,
    )
    return [dataclasses.replace(base, seed=None if body.seed is None else body.seed + j) for j in range(body.n)]


def _prompts(prompt: str | list) -> list[str | list[int]]:
    """OpenAI's prompt forms: a string, a list of strings, a token list, or a list of token lists."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt) if prompt else [""]


async def _openai_completion(server: _Server, body: CompletionRequest) -> JSONResponse | StreamingResponse:
    prompts = _prompts(body.prompt)
    params = _completion_params(body)
    requests = await server.build(prompts, params)
    job = server.batcher.submit(requests, stream=body.stream)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": cid, "object": "text_completion", "created": created, "model": server.model_name}
    if body.stream:
        return StreamingResponse(_sse(server, job, head, body), media_type="text/event-stream")
    completions = await server.collect(job)
    choices = [
        {
            "index": i,
            "text": c.text,
            "logprobs": None if body.logprobs is None else server.openai_logprobs(c.tokens, c.logprobs, c.top_logprobs),
            "finish_reason": c.finish_reason,
        }
        for i, c in enumerate(completions)
    ]
    return JSONResponse({**head, "choices": choices, "usage": _usage(requests, completions, body.n)})


def _usage(requests: list[EngineRequest], completions: list[Completion], n: int) -> dict:
    """Token counts; each prompt counts once, however many choices (``n``) it has."""
    prompt = sum(len(r.prompt) for r in requests[::n])
    done = sum(len(c.tokens) for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


async def _sse(server: _Server, job: Job, head: dict, body: CompletionRequest) -> AsyncIterator[str]:
    """Server-sent events: one chunk per released piece of text, then ``[DONE]``."""
    completions = [Completion(r.prompt) for r in job.requests]
    try:
        async for i, ev in server.events(job):
            completions[i].add(ev)
            if not ev.text and ev.finish_reason is None and ev.logprob is None:
                continue
            logprobs = None
            if body.logprobs is not None and ev.token is not None:
                tops = [ev.top_logprobs or {}]
                logprobs = server.openai_logprobs([ev.token], [ev.logprob or 0.0], tops)
            choice = {"index": i, "text": ev.text, "logprobs": logprobs, "finish_reason": ev.finish_reason}
            yield _event({**head, "choices": [choice]})
    except APIError as exc:
        yield _event({"error": {"message": exc.message, "type": "server_error", "param": None, "code": None}})
    if body.stream_options is not None and body.stream_options.include_usage:
        yield _event({**head, "choices": [], "usage": _usage(job.requests, completions, body.n)})
    yield "data: [DONE]\n\n"


def _event(data: dict) -> str:
    """One server-sent event; strict JSON (a non-finite number is an error here, never ``NaN`` on the wire)."""
    return f"data: {json.dumps(data, allow_nan=False)}\n\n"


async def _megatron(server: _Server, body: MegatronRequest) -> dict:
    """Megatron-LM's text generation server shape: completions include their prompts."""
    params = SamplingParams(
        max_new_tokens=body.tokens_to_generate,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p if body.top_p > 0 else 1.0,
        logprobs=0 if body.logprobs else None,
        seed=None if body.random_seed < 0 else body.random_seed,
        stop=["\n\n"] if body.stop_on_double_eol else ["\n"] if body.stop_on_eol else [],
    )
    requests = await server.build(body.prompts, [params])
    completions = await server.collect(server.batcher.submit(requests))
    texts = [p + c.text for p, c in zip(body.prompts, completions, strict=True)]
    segments = [server.token_strings(r.prompt + c.tokens) for r, c in zip(requests, completions, strict=True)]
    out: dict = {"text": texts, "segments": segments}
    if body.logprobs:
        out["logprobs"] = [c.logprobs or [] for c in completions]
    return out


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
    server = _Server(engine, name, batch_wait_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.batcher.start()
        yield
        server.batcher.stop()

    app = FastAPI(title="mtnlg", lifespan=lifespan)
    app.state.server, app.state.max_body_bytes = server, max_body_bytes
    _install_error_handlers(app)
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=max_body_bytes)
    app.add_middleware(_DeclaredSize, max_body_bytes=max_body_bytes)
    if api_key is not None:  # added last: runs first
        app.add_middleware(AuthenticationMiddleware, backend=_BearerKey(api_key),
                           on_error=lambda _, exc: _error(401, str(exc)))

    @app.get("/health")
    async def health() -> dict:
        b = server.batcher
        stats = {"batches": b.batches, "largest_batch": b.largest_batch, "admitted": b.admitted}
        return {"status": "ok", "model": server.model_name, **stats}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "mtnlg"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> JSONResponse | StreamingResponse:
        server.check(body)
        return await _openai_completion(server, body)

    @app.put("/api")
    async def megatron(body: MegatronRequest) -> dict:
        return await _megatron(server, body)

    return app


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

    config = uvicorn.Config(app, host=host, port=port, log_level="info")
    uvicorn.Server(config).run(sockets=[sock] if sock is not None else None)
