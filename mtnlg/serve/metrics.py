"""Operator metrics (``GET /metrics``, Prometheus' text format) and structured access logs.

Each app has its own ``CollectorRegistry``, so several apps in one process (tests, an embedding
application) keep separate counts. What is measured:

- ``mtnlg_requests_total{endpoint, status}`` and ``mtnlg_request_duration_seconds{endpoint}``: every
  HTTP request, refused ones included (401, 413, 400); ``endpoint`` is the route's path, or
  ``other`` for paths the server does not have (so a scan cannot create unbounded label values);
- ``mtnlg_connections_refused_total{code}``: connections answered before the app saw a request
  (``timeout``: no complete head by ``--header-timeout``; ``too_many_connections``: past
  ``--max-connections``; ``bad_http``: malformed HTTP), which the access log never sees;
- ``mtnlg_generated_tokens_total``: tokens generated, all endpoints together;
- ``mtnlg_time_to_first_token_seconds``: from a request's sequences entering the batcher's queue to
  each sequence's first token (queueing and prefill);
- ``mtnlg_time_per_output_token_seconds``: between a sequence's successive tokens (decode steps,
  shared with the rest of its batch);
- ``mtnlg_queue_depth`` (sequences waiting for a batch) and ``mtnlg_running_sequences`` (in the
  running batch) as gauges read at scrape time, and ``mtnlg_batch_size``, the sequences decoded
  by each step;
- with speculative decoding on, ``mtnlg_speculative_proposed_tokens_total`` and
  ``mtnlg_speculative_accepted_tokens_total`` (guesses made and kept), ``mtnlg_speculative_steps_total``
  (verifying forwards) and ``mtnlg_speculative_acceptance_rate`` (kept / made), read from the engine.
- with the block (paged) KV cache: ``mtnlg_kv_cache_blocks_in_use`` and ``mtnlg_kv_cache_blocks``
  (the pool), ``mtnlg_prefix_cache_hit_rate`` (prompt tokens found cached / prompt tokens admitted)
  and ``mtnlg_kv_cache_preemptions`` (sequences preempted for want of blocks, so far).

The access log is one JSON object per request on the ``mtnlg.access`` logger: method, path,
status, duration_s, tokens (generated for it) and client.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mtnlg.serve.batcher import Batcher, BatchObserver

access_log = logging.getLogger("mtnlg.access")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_KV_GAUGES = (
    ("mtnlg_kv_cache_blocks_in_use", "blocks_in_use", "KV cache blocks held by sequences."),
    ("mtnlg_kv_cache_blocks", "blocks_total", "KV cache blocks in the pool."),
    ("mtnlg_prefix_cache_hit_rate", "prefix_hit_rate", "Prompt tokens found in the prefix cache / prompt tokens."),
    ("mtnlg_kv_cache_preemptions", "preemptions", "Sequences preempted (to be recomputed) for want of blocks."),
)


class ServerMetrics(BatchObserver):
    """The server's Prometheus metrics, in a registry of their own; told of tokens and decode steps
    by the batcher (from its thread: prometheus_client's metrics are thread-safe)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("mtnlg_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"],
                                registry=r)
        self.duration = Histogram("mtnlg_request_duration_seconds", "HTTP request time, to the end of the body "
                                  "(a stream's last event).", ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("mtnlg_generated_tokens", "Tokens generated.", registry=r)
        self.first_token = Histogram("mtnlg_time_to_first_token_seconds", "From a request's sequences entering "
                                     "the queue to each one's first token.", buckets=_LATENCY_BUCKETS, registry=r)
        self.per_token = Histogram("mtnlg_time_per_output_token_seconds", "Between a sequence's successive tokens.",
                                   buckets=_TOKEN_BUCKETS, registry=r)
        self.batch_size = Histogram("mtnlg_batch_size", "Sequences decoded by one step.", buckets=_BATCH_BUCKETS,
                                    registry=r)
        self.queue_depth = Gauge("mtnlg_queue_depth", "Sequences waiting for a batch.", registry=r)
        self.running = Gauge("mtnlg_running_sequences", "Sequences in the running batch.", registry=r)
        self.refused = Counter("mtnlg_connections_refused", "Connections answered before a request reached the "
                               "app, by error code.", ["code"], registry=r)

    def watch(self, batcher: Batcher) -> None:
        """Read the gauges from ``batcher`` at each scrape."""
        self.queue_depth.set_function(batcher.waiting)
        self.running.set_function(lambda: batcher.running)
        speculation = getattr(batcher.engine, "speculation", None)
        if speculation is not None:
            self.registry.register(_SpeculationCollector(speculation))
        if batcher.engine.kv_stats() is None:
            return
        for name, key, doc in _KV_GAUGES:
            gauge = Gauge(name, doc, registry=self.registry)
            gauge.set_function(lambda key=key: batcher.engine.kv_stats()[key])

    def token(self, seconds: float, first: bool) -> None:
        self.tokens.inc()
        (self.first_token if first else self.per_token).observe(seconds)

    def step(self, batch_size: int) -> None:
        self.batch_size.observe(batch_size)

    def refused_connection(self, code: str) -> None:
        self.refused.labels(code).inc()

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class _SpeculationCollector:
    """The engine's speculative decoding counts (``Speculation.counts``), read at each scrape."""

    def __init__(self, speculation: object) -> None:
        self.speculation = speculation

    def collect(self) -> Iterator[Metric]:
        counts = self.speculation.counts
        for key, name, text in (("proposed", "proposed_tokens", "Tokens proposed to the target for verification."),
                                ("accepted", "accepted_tokens", "Proposed tokens the target kept."),
                                ("steps", "steps", "Verifying forwards of the target.")):
            yield CounterMetricFamily(f"mtnlg_speculative_{name}", text, value=counts[key])
        yield GaugeMetricFamily("mtnlg_speculative_acceptance_rate", "Proposed tokens kept / proposed.",
                                value=self.speculation.acceptance_rate())


class AccessLog:
    """ASGI middleware (the outermost): counts and times every request into ``metrics`` and logs it
    as one JSON line. A handler that generated puts its batcher job on ``request.state.job``,
    whose token count is read when the response (a stream included) has been sent."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics
        self._paths: frozenset[str] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500  # 500 unless a response starts (an exception escaped)
        state = scope.setdefault("state", {})

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self._record(scope, status, time.perf_counter() - start, state.get("job"))

    def _record(self, scope: Scope, status: int, seconds: float, job: object) -> None:
        if self._paths is None:
            self._paths = frozenset(getattr(route, "path", "") for route in scope["app"].routes)
        endpoint = scope["path"] if scope["path"] in self._paths else "other"
        self.metrics.requests.labels(endpoint, str(status)).inc()
        self.metrics.duration.labels(endpoint).observe(seconds)
        client = scope.get("client")
        access_log.info(json.dumps({
            "method": scope["method"], "path": scope["path"], "status": status, "duration_s": round(seconds, 6),
            "tokens": getattr(job, "generated", 0), "client": client[0] if client else None,
        }))


def log_to_stderr() -> None:
    """Print the access log's JSON lines on stderr, bare (``mtnlg serve``; an application embedding
    the app configures logging itself)."""
    if not access_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False
