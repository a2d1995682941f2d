"""Continuous batching for the HTTP server: handlers queue sequences, one worker thread decodes them.

Each handler queues its request's sequences as one job; the worker starts a batch with what is
waiting (after the first arrival it waits ``batch_wait_s`` for more, up to the engine's
``max_batch_size`` sequences), and between decode steps lets queued sequences join the running
batch while it has free rows and their prompt and budget fit (with the block KV cache: while free
blocks cover their prompts, ``mtnlg.generate.paged``); finished sequences leave it at
once, and so do those of a job that was stopped (its client left, or its deadline passed).

Rows are shared fairly: the next free row goes to the waiting job that holds the fewest rows
(the earliest among equals), so a request of many sequences cannot make a later one wait for
all of them. The sequences waiting are bounded (``max_queued``): past it ``submit`` raises
``QueueFull``, which the server answers with 503 and ``Retry-After``. Every event goes back to
its handler's asyncio queue. A ``BatchObserver`` is told, from
the worker thread, the time to each sequence's first token and between its next ones, and the
size of each decoded batch (the server's metrics).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from mtnlg.generate.engine import Decoder, Engine, TokenEvent
from mtnlg.generate.engine import Request as EngineRequest


@dataclass
class Job:
    """One HTTP request's sequences; their events arrive on ``events`` in lists of
    (sequence index, TokenEvent).

    A streaming job gets each token as it is made; any other job gets a sequence's tokens
    together when it finishes: every hand-over wakes the event loop's thread, which then competes
    with the model's compute threads for the cores. ``stopped`` is set by the handler when its
    client is gone or its answer is settled; the batcher then drops the job's sequences.
    """

    requests: list[EngineRequest]
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    stopped: threading.Event = field(default_factory=threading.Event)
    pending: list[tuple[int, TokenEvent]] = field(default_factory=list)  # the worker thread's, until handed over
    submitted: float = field(default_factory=time.monotonic)
    generated: int = 0  # tokens generated so far, all sequences together (counted by the worker thread)
    last_token: dict[int, float] = field(default_factory=dict)  # sequence -> when its latest token came
    queued: int = 0  # the next sequence to join a batch (the batcher's, under its lock)
    rows: int = 0  # its sequences in the running batch now (the worker thread's)

    def deliver(self, item: tuple[int, TokenEvent]) -> None:
        """Called from the worker thread."""
        self.pending.append(item)
        if not self.stream and item[1].finish_reason is None:
            return
        items, self.pending = self.pending, []
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, items)
        except RuntimeError:  # the client's event loop is gone
            self.stopped.set()


Slot = tuple[Job, int]  # a job and one of its sequences


class QueueFull(Exception):
    """More sequences would wait than the batcher's ``max_queued``."""

    def __init__(self, waiting: int, limit: int) -> None:
        super().__init__(f"the server is busy: {waiting} sequences are waiting, at most {limit} may "
                         f"(mtnlg serve --max-queued-sequences); retry later")


class BatchObserver:
    """What the worker thread reports (this base ignores it; the server's metrics record it)."""

    def token(self, seconds: float, first: bool) -> None:
        """A sequence made a token, ``seconds`` after its request was queued (``first``) or after its
        previous token."""

    def step(self, batch_size: int) -> None:
        """A decode step ran over ``batch_size`` sequences."""


class Batcher:
    """A worker thread that runs queued sequences through the engine, continuously batched.

    The thread owns the running batch (an engine ``Decoder``) and the map from its event indices
    to jobs; handlers only queue slots and read their job's events.
    """

    def __init__(
        self, engine: Engine, batch_wait_s: float = 0.005, observer: BatchObserver | None = None,
        max_queued: int | None = None,
    ) -> None:
        self.engine, self.batch_wait_s, self.max_queued = engine, batch_wait_s, max_queued
        self.observer = observer or BatchObserver()
        self._jobs: list[Job] = []  # jobs with sequences not yet in a batch, in arrival order
        self._ready = threading.Condition()
        self._held: Slot | None = None  # taken, but did not fit the running batch: goes first next time
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batches = 0  # batches started so far
        self.largest_batch = 0  # the most sequences one batch has decoded at once
        self.admitted = 0  # sequences that joined a batch already running
        self.running = 0  # sequences in the running batch now

    def waiting(self) -> int:
        """Sequences queued and not yet in a batch (those of stopped jobs not counted)."""
        with self._ready:
            return self._waiting()

    def _waiting(self) -> int:
        held = self._held is not None and not self._held[0].stopped.is_set()
        return held + sum(len(j.requests) - j.queued for j in self._jobs if not j.stopped.is_set())

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="mtnlg-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            with self._ready:
                self._stopping = True
                self._ready.notify_all()
            self._thread.join(timeout)
            self._thread = None

    def submit(self, requests: list[EngineRequest], stream: bool = False) -> Job:
        """Queue a request's sequences (called on the event loop); ``QueueFull`` past ``max_queued``."""
        job = Job(requests, asyncio.get_running_loop(), stream)
        with self._ready:
            waiting = self._waiting()
            if self.max_queued is not None and waiting + len(requests) > self.max_queued:
                raise QueueFull(waiting, self.max_queued)
            self._jobs.append(job)
            self._ready.notify()
        return job

    def _take(self, wait: float | None) -> Slot | None:
        """The next waiting slot: blocking (``wait`` None), for up to ``wait`` seconds, or None.
        It belongs to the waiting job with the fewest rows in the running batch."""
        if self._held is not None:
            slot, self._held = self._held, None
            return slot
        deadline = None if wait is None else time.monotonic() + wait
        with self._ready:
            while True:
                self._jobs = [j for j in self._jobs if not j.stopped.is_set()]
                if self._stopping:
                    return None
                if self._jobs:
                    job = min(self._jobs, key=lambda j: j.rows)  # min keeps the earliest among equals
                    slot, job.queued = (job, job.queued), job.queued + 1
                    if job.queued == len(job.requests):
                        self._jobs.remove(job)
                    return slot
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._ready.wait(left)

    def _gather(self, decoder: Decoder, wait: float) -> list[Slot]:
        """Waiting slots that can join ``decoder`` together, in ``_take``'s order (fewest rows first),
        taken for up to ``wait`` seconds; the first that cannot join is held for the next batch (and
        the others wait)."""
        deadline, taken = time.monotonic() + wait, []
        while (slot := self._take(max(0.0, deadline - time.monotonic()))) is not None:
            if slot[0].stopped.is_set():
                continue
            if not decoder.can_add([job.requests[i] for job, i in [*taken, slot]]):
                self._held = slot
                break
            taken.append(slot)
            slot[0].rows += 1  # counted now, so that the next take favours another job
        return taken

    def _work(self) -> None:
        while not self._stopping:
            first = self._take(None)
            if first is None:
                break
            self._held = first
            decoder = self.engine.decoder()
            owners: dict[int, Slot] = {}
            try:
                self._run(decoder, owners)
            except Exception as exc:  # a bug, not a request's fault: end this batch's sequences, keep serving
                for index, (job, i) in owners.items():
                    job.rows -= 1
                    job.deliver((i, TokenEvent(index, None, "", finish_reason="error", error=repr(exc))))
            finally:
                self.running = 0

    def _run(self, decoder: Decoder, owners: dict[int, Slot]) -> None:
        """One batch: start it with what is waiting, then step it, letting sequences join and leave."""
        slots = self._gather(decoder, self.batch_wait_s)
        if not slots:  # the first slot's job was stopped, or (never for a validated request) it fits nothing
            if self._held is not None and not decoder.can_add([self._held[0].requests[self._held[1]]]):
                job, i = self._held
                self._held = None
                job.deliver((i, TokenEvent(-1, None, "", finish_reason="error", error="does not fit the context")))
            return
        self.batches += 1
        self._add(decoder, owners, slots)
        while len(decoder):
            self.running = len(decoder)
            self.observer.step(self.running)
            self._deliver(owners, decoder.step())
            gone = {index for index in decoder.live() if owners[index][0].stopped.is_set()}
            self._deliver(owners, decoder.cancel(gone))
            if len(decoder):
                joined = self._gather(decoder, 0.0)
                self.admitted += len(joined)
                self._add(decoder, owners, joined)

    def _add(self, decoder: Decoder, owners: dict[int, Slot], slots: list[Slot]) -> None:
        if not slots:
            return
        indices, events = decoder.add([job.requests[i] for job, i in slots])
        owners.update(zip(indices, slots, strict=True))
        self._deliver(owners, events)
        self.largest_batch = max(self.largest_batch, len(decoder))

    def _deliver(self, owners: dict[int, Slot], events: list[TokenEvent]) -> None:
        now = time.monotonic()
        for event in events:
            job, i = owners[event.index] if event.finish_reason is None else owners.pop(event.index)
            job.rows -= event.finish_reason is not None
            if event.token is not None:
                previous = job.last_token.get(i)
                self.observer.token(now - (job.submitted if previous is None else previous), previous is None)
                job.last_token[i], job.generated = now, job.generated + 1
            job.deliver((i, event))
