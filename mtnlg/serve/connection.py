"""Connection limits below the app: a deadline for each connection's first request head, a cap on
open connections, malformed HTTP answered in the API's JSON shape, and the file limit.

uvicorn closes a keep-alive connection left idle after a response (``timeout_keep_alive``), caps
concurrency only once a complete head has arrived (``limit_concurrency``) and bounds a head's
size (``h11_max_incomplete_event_size``), but it has no deadline for a head: a client that
opens a connection and trickles (or never finishes) its first head holds a file descriptor
forever, before any key is checked. ``GuardedH11`` adds that deadline (408, then close) and
refuses a connection past the cap as it opens (503), so unfinished heads count too. The body's
deadline is the app's (``mtnlg.serve.middleware.BodyDeadline``). These refusals happen before the
app sees a request, so its access log cannot count them: each is reported to ``on_refuse`` with
its error code (``mtnlg_connections_refused_total`` in ``/metrics``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import resource
from collections.abc import Callable

from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    """How long a client may take and how many may be connected (``mtnlg serve`` flags)."""

    header_timeout_s: float = 10.0  # --header-timeout: the first request head must be complete by then
    body_timeout_s: float = 30.0  # --body-timeout: a body must be complete this long after its head
    keep_alive_s: int = 5  # an idle keep-alive connection closes after this
    max_connections: int = 1024  # --max-connections: open connections, unfinished heads included
    max_head_bytes: int = 16 * 1024  # a request head larger than this is malformed (400)


def _raw_response(status: int, reason: str, message: str, code: str, extra: str = "") -> bytes:
    """A complete JSON error response with ``Connection: close``, for a connection the app never saw."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500 else
                                 "server_error", "param": None, "code": code}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{extra}connection: close\r\n\r\n")
    return head.encode("ascii") + body


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a first-head deadline, a connection cap and JSON 400s."""

    limits = ConnectionLimits()
    on_refuse: Callable[[str], None] | None = None  # told each refusal's error code

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, "Service Unavailable", f"too many connections: at most {self.limits.max_connections} "
                         "(mtnlg serve --max-connections); retry later", "too_many_connections", "retry-after: 1\r\n")
            return
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_overdue)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _head_overdue(self) -> None:
        """No complete head yet on this connection (later heads are bounded by the keep-alive timeout)."""
        if self.cycle is None and not self.transport.is_closing():
            self._refuse(408, "Request Timeout", f"request head not received within {self.limits.header_timeout_s:g} s "
                         "(mtnlg serve --header-timeout)", "timeout")

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, "Bad Request", f"malformed HTTP request: {msg}", "bad_http")

    def _refuse(self, status: int, reason: str, message: str, code: str, extra: str = "") -> None:
        self.logger.debug("%s", message)  # not a warning: a flood of slow clients would flood the log
        if self.on_refuse is not None:
            self.on_refuse(code)
        self.transport.write(_raw_response(status, reason, message, code, extra))
        self.transport.close()


def protocol_for(limits: ConnectionLimits, on_refuse: Callable[[str], None] | None = None) -> type[GuardedH11]:
    """A ``GuardedH11`` holding ``limits`` and ``on_refuse`` (uvicorn makes each connection's
    protocol from a class)."""
    return type("GuardedH11", (GuardedH11,), {"limits": limits, "on_refuse": staticmethod(on_refuse)})


def raise_file_limit(wanted: int) -> int:
    """Raise the soft limit of open files towards ``wanted`` (at most the hard limit); returns the
    soft limit now. Each connection is a descriptor: a soft limit of 256 or 1024 is a connection
    cap far below what the server could hold."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def uvicorn_config(app: object, limits: ConnectionLimits, **options: object) -> object:
    """uvicorn's settings for ``app`` under ``limits``; ``options`` are further ``uvicorn.Config``
    arguments (host, port, log_level...). The file limit is raised to cover the connection cap, and
    refused connections are counted in the app's metrics when it has them (``app.state.metrics``)."""
    import uvicorn

    fds = raise_file_limit(limits.max_connections + 256)  # + the model's files, the logs, the listening socket
    if fds < limits.max_connections + 64:
        limits = dataclasses.replace(limits, max_connections=max(1, fds - 64))
    metrics = getattr(getattr(app, "state", None), "metrics", None)
    on_refuse = getattr(metrics, "refused_connection", None)
    return uvicorn.Config(app, http=protocol_for(limits, on_refuse), timeout_keep_alive=limits.keep_alive_s,
                          h11_max_incomplete_event_size=limits.max_head_bytes, **options)
