"""Tensor-parallel serving: rank 0 schedules, every rank runs the same decoder calls on its shard.

Under ``torchrun --nproc_per_node=N -m mtnlg serve --tp N`` rank 0 runs the HTTP server and the
batcher over a ``LeaderEngine``. Its decoders are ``LeaderDecoder``s: each call that changes a batch
(``add``, ``step``, ``cancel``, and making a new decoder) is first sent to the other ranks, which
``follow`` by making the same call on decoders of their own. Every rank then runs the same forward
pass on its shard, joined by the model's own collectives; sampling agrees because the gathered
logits are the same on every rank and each request's seed is settled on rank 0 before it is sent.
Queries (``can_add``, ``live``, ``len``) are answered by rank 0's decoder alone: the batches agree.

The messages travel over a gloo group of their own (pickled, on the CPU, whatever device the
model is on: NCCL carries only the model's collectives), one point-to-point send per rank, so a
failure names the rank. An idle rank 0 sends a heartbeat every ``HEARTBEAT_S``; a rank that hears
nothing for the channel's timeout, or whose sender is gone, stops; rank 0, when a send fails,
calls ``on_lost`` with a one-line message (the server prints it and exits: never a hang).
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from mtnlg.generate.engine import Decoder, Engine, Request

HEARTBEAT_S = 1.0
CHANGES = frozenset({"add", "step", "cancel"})  # the decoder calls the other ranks replay


class RankLost(RuntimeError):
    """Another rank of the job died or stopped answering."""


class Channel:
    """Rank 0's messages to the other ranks (collective to build: every rank makes one)."""

    def __init__(self, timeout_s: float, on_lost: Callable[[str], None] | None = None) -> None:
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.timeout_s, self.on_lost = timeout_s, on_lost
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._closed = threading.Event()
        self.lost: str | None = None

    def send(self, op: str, *args: Any, **kwargs: Any) -> None:
        """Rank 0: tell every other rank to make this call (``RankLost`` if one cannot be reached)."""
        with self._lock:
            if self.lost is None:
                self._each_rank(lambda rank: dist.send_object_list([(op, args, kwargs)], dst=rank, group=self.group))
                self._last = time.monotonic()
        self._raise_if_lost()

    def _each_rank(self, call: Callable[[int], None]) -> None:
        """``call(rank)`` for every other rank, until one fails: ``lost`` then says which."""
        for rank in range(1, self.world_size):
            try:
                call(rank)
            except Exception as exc:  # gloo raises RuntimeError or DistError
                self.lost = f"rank {rank} of {self.world_size} is gone (it exited or stopped answering: {_reason(exc)})"
                return

    def receive(self) -> tuple[str, tuple, dict]:
        """Another rank: the next call rank 0 made (``RankLost`` when rank 0 is gone or silent)."""
        box: list[Any] = [None]
        try:
            dist.recv_object_list(box, src=0, group=self.group)
        except Exception as exc:
            raise RankLost(f"rank {self.rank} of {self.world_size}: rank 0 is gone or silent for "
                           f"{self.timeout_s:g} s ({_reason(exc)})") from None
        return box[0]

    def start_heartbeat(self) -> None:
        """Rank 0: while idle, a message every ``HEARTBEAT_S`` keeps the others from timing out and
        finds a rank that died between requests."""

        def beat() -> None:
            while not self._closed.wait(HEARTBEAT_S / 2):
                if time.monotonic() - self._last >= HEARTBEAT_S:
                    try:
                        self.send("ping")
                    except RankLost:
                        return

        threading.Thread(target=beat, name="mtnlg-heartbeat", daemon=True).start()

    def close(self) -> None:
        """Rank 0: stop the heartbeat, let the other ranks return from ``follow`` and wait for each to
        say so (a send to a rank that just died may still succeed: its answer cannot)."""
        self._closed.set()
        self.send("stop")
        with self._lock:
            self._each_rank(lambda rank: dist.recv_object_list([None], src=rank, group=self.group))
        self._raise_if_lost()

    def _raise_if_lost(self) -> None:
        if self.lost is not None:
            if self.on_lost is not None:
                self.on_lost(self.lost)
            raise RankLost(self.lost)

    def acknowledge(self) -> None:
        """Another rank: tell rank 0 this rank got its ``stop``."""
        dist.send_object_list(["stopped"], dst=0, group=self.group)


def _reason(exc: BaseException) -> str:
    """The gist of a gloo error: its first sentence, without the source location it starts with."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc))
    return text.split(". ")[0][:200]


class LeaderDecoder:
    """Rank 0's decoder: a call that changes the batch is sent to the other ranks, then made here."""

    def __init__(self, decoder: Decoder, engine: LeaderEngine) -> None:
        self._decoder, self._engine = decoder, engine

    def __len__(self) -> int:
        return len(self._decoder)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._decoder, name)
        if name not in CHANGES:
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            if name == "add":  # seeds settled here, so that every rank samples alike
                args = (self._engine.seeded(args[0]), *args[1:])
            if name != "cancel" or args[0]:  # cancelling nothing changes nothing
                self._engine.channel.send(name, *args, **kwargs)
            return value(*args, **kwargs)

        return call


class LeaderEngine(Engine):
    """Rank 0's engine: its decoders are ``LeaderDecoder``s, replayed by the ranks that ``follow``."""

    def __init__(self, channel: Channel, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.channel = channel

    def decoder(self, *args: Any, **kwargs: Any) -> Decoder:
        self.channel.send("decoder", *args, **kwargs)
        return LeaderDecoder(super().decoder(*args, **kwargs), self)  # type: ignore[return-value]

    def inspect(self, *args: Any, **kwargs: Any) -> Any:
        """Not under tp: rank 0 alone would run the model, whose collectives wait for every rank."""
        raise NotImplementedError("the token inspector runs in one process: serve the model without --tp "
                                  "to inspect it")

    def seeded(self, requests: Sequence[Request]) -> list[Request]:
        """``requests`` with each seed made explicit (drawn here when the request brings none)."""
        return [Request(r.prompt, dataclasses.replace(r.params, seed=self.seed_for(r.params))) for r in requests]


def follow(engine: Engine, channel: Channel) -> None:
    """A rank other than 0: make every decoder call rank 0 sends, on this rank's shard, until it
    sends ``stop`` (``RankLost`` if it goes away)."""
    decoder: Decoder | None = None
    while True:
        op, args, kwargs = channel.receive()
        if op == "stop":
            channel.acknowledge()
            return
        if op == "decoder":
            decoder = engine.decoder(*args, **kwargs)
        elif op in CHANGES and decoder is not None:
            getattr(decoder, op)(*args, **kwargs)
        elif op != "ping":
            raise RuntimeError(f"rank {channel.rank}: unknown message {op!r} from rank 0")
