"""Continuous batching for the HTTP server: handlers queue sequences, one worker thread decodes them.

Each handler puts its sequences on a queue; the worker starts a batch with what is waiting
(after the first arrival it waits ``batch_wait_s`` for more, up to the engine's
``max_batch_size`` sequences), and between decode steps lets queued sequences join the running
batch while it has free rows and their prompt and budget fit; finished sequences leave it at
once. Every event goes back to its handler's asyncio queue. A ``BatchObserver`` is told, from
the worker thread, the time to each sequence's first token and between its next ones, and the
size of each decoded batch (the server's metrics).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from queue import Empty, Queue

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

    def __init__(self, engine: Engine, batch_wait_s: float = 0.005, observer: BatchObserver | None = None) -> None:
        self.engine, self.batch_wait_s = engine, batch_wait_s
        self.observer = observer or BatchObserver()
        self._queue: Queue[Slot | None] = Queue()  # None: stop after the running batch
        self._held: Slot | None = None  # taken, but did not fit the running batch: goes first next time
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batches = 0  # batches started so far
        self.largest_batch = 0  # the most sequences one batch has decoded at once
        self.admitted = 0  # sequences that joined a batch already running
        self.running = 0  # sequences in the running batch now

    def waiting(self) -> int:
        """Sequences queued and not yet in a batch (approximate while the worker takes them)."""
        return self._queue.qsize() + (self._held is not None)

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="mtnlg-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, requests: list[EngineRequest], stream: bool = False) -> Job:
        """Queue a request's sequences (called on the event loop)."""
        job = Job(requests, asyncio.get_running_loop(), stream)
        for i in range(len(requests)):
            self._queue.put((job, i))
        return job

    def _take(self, wait: float | None) -> Slot | None:
        """The next waiting slot: blocking (``wait`` None), for up to ``wait`` seconds, or None."""
        if self._held is not None:
            slot, self._held = self._held, None
            return slot
        if self._stopping:
            return None
        try:
            slot = self._queue.get(timeout=wait) if wait is None or wait > 0 else self._queue.get_nowait()
        except Empty:
            return None
        self._stopping = slot is None
        return slot

    def _gather(self, decoder: Decoder, wait: float) -> list[Slot]:
        """Waiting slots that can join ``decoder`` together, in arrival order, taken for up to ``wait``
        seconds; the first that cannot join is held for the next batch (and those after it wait)."""
        deadline, taken = time.monotonic() + wait, []
        while (slot := self._take(max(0.0, deadline - time.monotonic()))) is not None:
            if slot[0].stopped.is_set():
                continue
            if not decoder.can_add([job.requests[i] for job, i in [*taken, slot]]):
                self._held = slot
                break
            taken.append(slot)
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
            if event.token is not None:
                previous = job.last_token.get(i)
                self.observer.token(now - (job.submitted if previous is None else previous), previous is None)
                job.last_token[i], job.generated = now, job.generated + 1
            job.deliver((i, event))
