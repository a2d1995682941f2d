"""HTTP serving over one Engine: OpenAI-compatible completions, Megatron's ``PUT /api``, health.

Concurrent requests are decoded together (continuous batching): each handler puts its
sequences on a queue; one worker thread starts a batch with what is waiting (after the first
arrival it waits ``batch_wait_s`` for more, up to ``max_batch_size`` sequences), and between
decode steps lets queued sequences join the running batch while it has free rows and their
prompt and budget fit; finished sequences leave it at once. Every event goes back to its
handler's asyncio queue. The event loop only parses, validates and streams, so it keeps
answering (health, bad requests) while a batch runs.

Errors are JSON in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for
malformed or out-of-range requests, 401 without the right ``Authorization: Bearer`` key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Queue

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from mtnlg.generate.engine import Completion, Engine, SamplingParams, TokenEvent
from mtnlg.generate.engine import Request as EngineRequest
from mtnlg.generate.protocol import CompletionRequest, MegatronRequest

API_KEY_ENV = "MTNLG_API_KEY"


# -- batching ---------------------------------------------------------------------------------------


@dataclass
class _Job:
    """One HTTP request's sequences; their events arrive on ``events`` in lists of
    (sequence index, TokenEvent), or as the exception that ended the batch.

    A streaming job gets each token as it is made; any other job gets a sequence's tokens
    together when it finishes: every hand-over wakes the event loop's thread, which then competes
    with the model's compute threads for the cores.
    """

    requests: list[EngineRequest]
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    stopped: threading.Event = field(default_factory=threading.Event)
    pending: list[tuple[int, TokenEvent]] = field(default_factory=list)  # the worker thread's, until handed over

    def deliver(self, item: tuple[int, TokenEvent] | BaseException) -> None:
        """Called from the worker thread."""
        if isinstance(item, tuple):
            self.pending.append(item)
            if not self.stream and item[1].finish_reason is None:
                return
            item, self.pending = self.pending, []
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the client's event loop is gone
            self.stopped.set()


class Batcher:
    """A worker thread that runs queued sequences through the engine, continuously batched."""

    def __init__(self, engine: Engine, batch_wait_s: float = 0.005) -> None:
        self.engine, self.batch_wait_s = engine, batch_wait_s
        self._queue: Queue[tuple[_Job, int] | None] = Queue()
        self._held: deque[tuple[_Job, int]] = deque()  # taken but did not fit the last batch
        self._thread: threading.Thread | None = None
        self.batches = 0  # batches started so far
        self.largest_batch = 0  # the most sequences one batch has run (joiners included)
        self.admitted = 0  # sequences that joined a batch already running

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="mtnlg-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, requests: list[EngineRequest], stream: bool = False) -> _Job:
        """Queue a request's sequences (called on the event loop)."""
        job = _Job(requests, asyncio.get_running_loop(), stream)
        for r in requests:
            r.cancelled = job.stopped.is_set
        for i in range(len(requests)):
            self._queue.put((job, i))
        return job

    def _next_batch(self) -> list[tuple[_Job, int]] | None:
        """Block for the first sequence, then gather what fits until the wait runs out."""
        first = self._held.popleft() if self._held else self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.engine.max_batch_size:
            try:
                wait = max(0.0, deadline - time.monotonic())
                item = self._held.popleft() if self._held else self._queue.get(timeout=wait)
            except Empty:
                break
            if item is None:
                self._queue.put(None)  # stop after this batch
                break
            if not self.engine.fits([job.requests[i] for job, i in batch + [item]]):
                self._held.appendleft(item)
                break
            batch.append(item)
        return batch

    def _admit(self, batch: list[tuple[_Job, int]], can_join: Callable[[EngineRequest], bool]) -> list[EngineRequest]:
        """Sequences waiting in the queue that can join the running batch now (continuous batching).
        In arrival order: the first that cannot join waits for the next batch, and so do those after it."""
        joined: list[EngineRequest] = []
        while True:
            item = self._held.popleft() if self._held else self._poll()
            if item is None:
                break
            job, i = item
            if job.stopped.is_set():
                continue
            if not can_join(job.requests[i]):
                self._held.appendleft(item)
                break
            batch.append(item)
            joined.append(job.requests[i])
        self.admitted += len(joined)
        return joined

    def _poll(self) -> tuple[_Job, int] | None:
        try:
            item = self._queue.get_nowait()
        except Empty:
            return None
        if item is None:
            self._queue.put(None)  # stop: leave the sentinel for _next_batch
        return item

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            batch = [(job, i) for job, i in batch if not job.stopped.is_set()]
            if not batch:
                continue
            self.batches += 1
            try:
                events = self.engine.run([job.requests[i] for job, i in batch], functools.partial(self._admit, batch))
                for event in events:
                    job, i = batch[event.index]
                    job.deliver((i, event))
            except Exception as exc:  # report to every waiting client, keep serving
                for job, _ in batch:
                    job.deliver(exc)
            self.largest_batch = max(self.largest_batch, len(batch))


# -- errors and auth -------------------------------------------------------------------------------


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


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
        return _error(exc.status, exc.message, exc.param)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), kind="not_found" if exc.status_code == 404 else "error")


def _auth_dependency(api_key: str | None) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

    return check


# -- request handling ------------------------------------------------------------------------------


class _Server:
    """The state behind the routes: engine, batcher, model name."""

    def __init__(self, engine: Engine, model_name: str, batch_wait_s: float) -> None:
        self.engine, self.model_name = engine, model_name
        self.batcher = Batcher(engine, batch_wait_s)
        self.created = int(time.time())

    def build(self, prompts: Sequence[str | list[int]], params: list[SamplingParams]) -> list[EngineRequest]:
        try:
            return [self.engine.request(p, sp) for p in prompts for sp in params]
        except ValueError as exc:
            raise APIError(400, str(exc)) from None

    async def collect(self, job: _Job) -> list[Completion]:
        out = [Completion(r.prompt) for r in job.requests]
        async for i, event in self.events(job):
            out[i].add(event)
        return out

    async def events(self, job: _Job) -> AsyncIterator[tuple[int, TokenEvent]]:
        """A job's events until all its sequences finish; stops the job if the consumer leaves."""
        remaining = len(job.requests)
        try:
            while remaining:
                items = await job.events.get()
                if isinstance(items, BaseException):
                    raise APIError(500, f"generation failed: {items!r}")
                for item in items:
                    remaining -= item[1].finish_reason is not None
                    yield item
        finally:
            job.stopped.set()

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
    requests = server.build(prompts, params)
    if len(requests) > 64:
        raise APIError(400, f"{len(requests)} sequences requested (prompts x n); at most 64 per request")
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


async def _sse(server: _Server, job: _Job, head: dict, body: CompletionRequest) -> AsyncIterator[str]:
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
            yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
    except APIError as exc:
        yield f"data: {json.dumps({'error': {'message': exc.message, 'type': 'server_error'}})}\n\n"
    if body.stream_options and body.stream_options.get("include_usage"):
        yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(job.requests, completions, body.n)})}\n\n"
    yield "data: [DONE]\n\n"


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
    requests = server.build(body.prompts, [params])
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
) -> FastAPI:
    """The FastAPI app serving an engine (or a checkpoint directory, loaded here)."""
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
    app.state.server = server
    _install_error_handlers(app)
    auth = [Depends(_auth_dependency(api_key))]

    @app.get("/health")
    async def health() -> dict:
        b = server.batcher
        stats = {"batches": b.batches, "largest_batch": b.largest_batch, "admitted": b.admitted}
        return {"status": "ok", "model": server.model_name, **stats}

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        card = {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "mtnlg"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", dependencies=auth, response_model=None)
    async def completions(body: CompletionRequest) -> JSONResponse | StreamingResponse:
        return await _openai_completion(server, body)

    @app.put("/api", dependencies=auth)
    async def megatron(body: MegatronRequest) -> dict:
        return await _megatron(server, body)

    return app


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
