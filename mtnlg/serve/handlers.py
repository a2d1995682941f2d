"""What the HTTP routes do: OpenAI's completions and chat completions, Megatron-LM's ``PUT /api``.

Both OpenAI endpoints go the same way (``respond``): a request becomes engine requests (one per
prompt and choice, validated and tokenized off the event loop), which the one ``Batcher`` decodes
with everyone else's; the answer is collected whole or streamed as server-sent events. Only the
shapes differ (``TextFormat``, ``ChatFormat``). A chat request is its messages rendered by the
checkpoint's chat template up to where the assistant speaks, and its answer ends at the
template's end-of-turn marker (one more stop string).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from functools import cached_property

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from mtnlg.config.sampling import SAMPLING
from mtnlg.data.chat_template import ChatTemplate
from mtnlg.generate.engine import Completion, Engine, SamplingParams, TokenEvent
from mtnlg.generate.engine import Request as EngineRequest
from mtnlg.serve.batcher import Batcher, BatchObserver, Job, QueueFull
from mtnlg.serve.middleware import within
from mtnlg.serve.protocol import ChatCompletionRequest, CompletionRequest, MegatronRequest, _SamplingBody

MAX_SEQUENCES = 64  # prompts x n in one request
GONE, LATE = "client gone", "deadline passed"  # what the watcher of a request tells its events
RETRY_AFTER_S = 1  # what a 503 for a full queue tells the client to wait
_API_NAMES = {"max_new_tokens": "max_tokens", "ignore_eod": "ignore_eos", "stop": "stop"}


class APIError(Exception):
    """A request that cannot be served: answered with ``status`` and OpenAI's error shape."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


class ServerState:
    """The state behind the routes: engine, batcher, model name, chat template, and how long a
    request may take (``request_timeout_s``, None for no limit)."""

    def __init__(
        self, engine: Engine, model_name: str, batch_wait_s: float, observer: BatchObserver,
        max_queued: int | None = None, request_timeout_s: float | None = None,
    ) -> None:
        self.engine, self.model_name, self.request_timeout_s = engine, model_name, request_timeout_s
        self.batcher = Batcher(engine, batch_wait_s, observer, max_queued)
        self.created = int(time.time())

    def submit(self, request: Request, requests: list[EngineRequest], stream: bool = False) -> Job:
        """Queue the sequences; a full queue is a 503 with ``Retry-After``."""
        try:
            job = self.batcher.submit(requests, stream=stream)
        except QueueFull as exc:
            raise APIError(503, str(exc), code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        request.state.job = job  # the access log and metrics count its tokens
        return job

    @cached_property
    def template(self) -> ChatTemplate:
        if self.engine.tokenizer is None:
            raise APIError(400, "chat needs a tokenizer, and this model has none", param="messages")
        return ChatTemplate.of(self.engine.tokenizer)

    async def build(
        self, prompts: Sequence[str | list[int]], params: list[SamplingParams], prompt_field: str = "prompt"
    ) -> list[EngineRequest]:
        """Validated engine requests, prompt-major. The count is checked before anything is tokenized;
        each prompt is tokenized once (not once per choice), in a worker thread, so the event loop
        keeps answering meanwhile."""
        if len(prompts) * len(params) > MAX_SEQUENCES:
            raise APIError(400, f"{len(prompts)} prompts x n={len(params)} sequences requested; "
                                f"at most {MAX_SEQUENCES} per request", param="n")
        seq_len = self.engine.seq_len
        if params and params[0].max_new_tokens >= seq_len:  # too many whatever the prompt: the limit's fault
            raise APIError(400, f"max_tokens {params[0].max_new_tokens} leaves no room for a prompt in the "
                                f"context length {seq_len}: at most {seq_len - 1}", param="max_tokens")
        try:
            return await asyncio.to_thread(self._requests, prompts, params)
        except ValueError as exc:  # messages start with the field: SamplingParams' name, or the prompt's
            field = str(exc).split(" ", 1)[0]
            if field in SAMPLING or field in _API_NAMES:
                raise APIError(400, str(exc), param=_API_NAMES.get(field, field)) from None
            about = "" if prompt_field == "prompt" else f"{prompt_field} (rendered with the chat template): "
            raise APIError(400, about + str(exc), param=prompt_field) from None

    def _requests(self, prompts: Sequence[str | list[int]], params: list[SamplingParams]) -> list[EngineRequest]:
        out = []
        for prompt in prompts:
            first = self.engine.request(prompt, params[0])
            out += [first] + [self.engine.request(first.prompt, sp) for sp in params[1:]]
        return out

    async def collect(self, job: Job, request: Request) -> list[Completion]:
        """Every sequence's completion; the job stops as soon as its client is gone."""
        out = [Completion(r.prompt) for r in job.requests]
        async for i, event in self.events(job, request):
            out[i].add(event)
        return out

    async def events(self, job: Job, request: Request | None = None) -> AsyncIterator[tuple[int, TokenEvent]]:
        """A job's events until all its sequences finish; stops the job if the consumer leaves, the
        client disconnects (watched when ``request`` is given: a stream's response watches itself)
        or the deadline passes (then a 504)."""
        remaining = len(job.requests)
        watcher = asyncio.create_task(self._watch(job, request))
        try:
            while remaining:
                items = await job.events.get()
                if items == GONE:
                    return
                if items == LATE:
                    raise APIError(504, f"the request took longer than the server's limit of "
                                        f"{self.request_timeout_s:g} s (mtnlg serve --request-timeout)",
                                   code="timeout")
                for item in items:
                    if item[1].finish_reason == "error":
                        raise APIError(500, f"generation failed: {item[1].error}")
                    remaining -= item[1].finish_reason is not None
                    yield item
        finally:
            job.stopped.set()
            watcher.cancel()

    async def _watch(self, job: Job, request: Request | None) -> None:
        """Stop the job, and wake ``events``, when the client disconnects or the deadline passes.

        The body has been read, so the next ASGI message is the disconnect: one pending
        ``receive`` waits for it without waking the event loop meanwhile (polling would, and every
        wake-up takes the GIL from the decoding thread)."""
        deadline = None if self.request_timeout_s is None else job.submitted + self.request_timeout_s
        reason = LATE
        try:
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if request is None:
                    if left is None:
                        return
                    await asyncio.sleep(left)
                    break
                if (await within(request.receive(), left))["type"] == "http.disconnect":
                    reason = GONE
                    break
        except asyncio.TimeoutError:
            pass
        job.stopped.set()
        job.events.put_nowait(reason)

    def check(self, body: _SamplingBody) -> None:
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


# -- the two OpenAI response shapes -----------------------------------------------------------------


class TextFormat:
    """``/v1/completions``: choices carry ``text`` and log-probs as token/offset lists."""

    object = chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, server: ServerState, alternatives: int | None) -> None:
        self.server, self.alternatives = server, alternatives

    def logprobs(self, tokens: list[int], logprobs: list[float] | None, tops: list[dict] | None) -> dict | None:
        if self.alternatives is None:
            return None
        strs = self.server.token_strings(tokens)
        offsets = [sum(len(s) for s in strs[:i]) for i in range(len(strs))]
        top = [{self.server.token_strings([t])[0]: v for t, v in d.items()} for d in tops or []]
        return {"tokens": strs, "token_logprobs": logprobs or [], "top_logprobs": top, "text_offset": offsets}

    def event_logprobs(self, ev: TokenEvent) -> dict | None:
        if self.alternatives is None or ev.token is None:
            return None
        return self.logprobs([ev.token], [ev.logprob or 0.0], [ev.top_logprobs or {}])

    def choice(self, i: int, c: Completion) -> dict:
        logprobs = self.logprobs(c.tokens, c.logprobs, c.top_logprobs)
        return {"index": i, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish_reason}

    def opening(self, i: int) -> dict | None:
        """A choice's first chunk, before any text (none here)."""
        return None

    def piece(self, i: int, ev: TokenEvent) -> dict:
        return {"index": i, "text": ev.text, "logprobs": self.event_logprobs(ev), "finish_reason": ev.finish_reason}


class ChatFormat(TextFormat):
    """``/v1/chat/completions``: choices carry an assistant ``message``; chunks carry a ``delta``, the
    first with the role; log-probs are per-token entries with their alternatives."""

    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def logprobs(self, tokens: list[int], logprobs: list[float] | None, tops: list[dict] | None) -> dict | None:
        if self.alternatives is None:
            return None

        def entry(token: int, logprob: float) -> dict:
            text = self.server.token_strings([token])[0]
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        content = [{**entry(t, lp), "top_logprobs": [entry(a, v) for a, v in top.items()]}
                   for t, lp, top in zip(tokens, logprobs or [], tops or [], strict=False)]
        return {"content": content}

    def choice(self, i: int, c: Completion) -> dict:
        message = {"role": "assistant", "content": c.text}
        return {"index": i, "message": message, "logprobs": self.logprobs(c.tokens, c.logprobs, c.top_logprobs),
                "finish_reason": c.finish_reason}

    def opening(self, i: int) -> dict | None:
        return {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def piece(self, i: int, ev: TokenEvent) -> dict:
        delta = {"content": ev.text} if ev.text else {}
        return {"index": i, "delta": delta, "logprobs": self.event_logprobs(ev), "finish_reason": ev.finish_reason}


# -- handlers ---------------------------------------------------------------------------------------


def sampling_params(body: _SamplingBody, max_new_tokens: int, stop: list[str]) -> list[SamplingParams]:
    """One SamplingParams per choice; choice j of a seeded request uses seed + j."""
    base = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        repetition_penalty=body.repetition_penalty,
        stop=stop,
        logprobs=body.alternatives,
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


async def completion(
    server: ServerState, request: Request, body: CompletionRequest
) -> JSONResponse | StreamingResponse:
    server.check(body)
    params = sampling_params(body, body.max_tokens, body.stops)
    requests = await server.build(_prompts(body.prompt), params)
    return await respond(server, request, body, requests, TextFormat(server, body.alternatives))


async def chat_completion(
    server: ServerState, request: Request, body: ChatCompletionRequest
) -> JSONResponse | StreamingResponse:
    """The messages rendered up to the assistant's turn and tokenized here (the template's markers as
    special tokens, the content as plain text); without a token limit, the answer may use the rest
    of the context."""
    server.check(body)
    template = server.template
    try:
        text = template.render([m.plain() for m in body.messages])
    except ValueError as exc:  # "messages[i].role: ..." names the field
        raise APIError(400, str(exc), param=str(exc).split(":")[0].split(" ")[0]) from None
    seq_len = server.engine.seq_len
    try:  # ids, so that only the template's own markers are special tokens (the content is plain text)
        prompt = await asyncio.to_thread(server.engine.encode, text, seq_len - 1, template.special_tokens)
    except ValueError as exc:
        raise APIError(400, f"messages: {exc}", param="messages") from None
    limit = body.limit
    if limit is None:
        limit = seq_len - len(prompt)
        if limit < 1:
            raise APIError(400, f"messages: the conversation's {len(prompt)} tokens fill the context length "
                                f"{seq_len}, leaving no room for an answer", param="messages")
    params = sampling_params(body, limit, [*body.stops, template.end])
    requests = await server.build([prompt], params, prompt_field="messages")
    return await respond(server, request, body, requests, ChatFormat(server, body.alternatives))


async def respond(
    server: ServerState, request: Request, body: _SamplingBody, requests: list[EngineRequest], fmt: TextFormat
) -> JSONResponse | StreamingResponse:
    """Queue the requests for the batcher; answer with every choice, or stream them."""
    job = server.submit(request, requests, stream=body.stream)
    head = {"id": f"{fmt.id_prefix}{uuid.uuid4().hex}", "object": fmt.object, "created": int(time.time()),
            "model": server.model_name}
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        chunks = _sse(server, job, {**head, "object": fmt.chunk_object}, fmt, usage, body.n)
        return StreamingResponse(chunks, media_type="text/event-stream")
    completions = await server.collect(job, request)
    choices = [fmt.choice(i, c) for i, c in enumerate(completions)]
    return JSONResponse({**head, "choices": choices, "usage": _usage(requests, completions, body.n)})


def _usage(requests: list[EngineRequest], completions: list[Completion], n: int) -> dict:
    """Token counts; each prompt counts once, however many choices (``n``) it has."""
    prompt = sum(len(r.prompt) for r in requests[::n])
    done = sum(len(c.tokens) for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


async def _sse(
    server: ServerState, job: Job, head: dict, fmt: TextFormat, include_usage: bool, n: int
) -> AsyncIterator[str]:
    """Server-sent events: each choice's opening chunk, one chunk per released piece of text, the
    usage if asked, then ``[DONE]``."""
    completions = [Completion(r.prompt) for r in job.requests]
    for i in range(len(job.requests)):
        if (opening := fmt.opening(i)) is not None:
            yield _event({**head, "choices": [opening]})
    try:
        async for i, ev in server.events(job):
            completions[i].add(ev)
            if ev.text or ev.finish_reason is not None or ev.logprob is not None:
                yield _event({**head, "choices": [fmt.piece(i, ev)]})
    except APIError as exc:
        yield _event({"error": {"message": exc.message, "type": "server_error", "param": None, "code": None}})
    if include_usage:
        yield _event({**head, "choices": [], "usage": _usage(job.requests, completions, n)})
    yield "data: [DONE]\n\n"


def _event(data: dict) -> str:
    """One server-sent event; strict JSON (a non-finite number is an error here, never ``NaN`` on the wire)."""
    return f"data: {json.dumps(data, allow_nan=False)}\n\n"


async def megatron(server: ServerState, request: Request, body: MegatronRequest) -> dict:
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
    job = server.submit(request, requests)
    completions = await server.collect(job, request)
    texts = [p + c.text for p, c in zip(body.prompts, completions, strict=True)]
    segments = [server.token_strings(r.prompt + c.tokens) for r, c in zip(requests, completions, strict=True)]
    out: dict = {"text": texts, "segments": segments}
    if body.logprobs:
        out["logprobs"] = [c.logprobs or [] for c in completions]
    return out
