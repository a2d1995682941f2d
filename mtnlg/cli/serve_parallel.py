"""``torchrun --nproc_per_node=N -m mtnlg serve --tp N``: rank 0 serves HTTP, every rank decodes its shard.

Every rank loads only its own shards (``load_parallel_for_inference``); rank 0 then runs the same
app, batcher, metrics and limits as one process, over a ``LeaderEngine`` whose decoder calls the
other ranks replay (``mtnlg.generate.lockstep``). A rank that dies ends the job with one line:
rank 0 prints which rank is gone and exits; the others exit when rank 0 is gone or silent.

Pipeline parallelism is refused (``parallelize``): a decode step is one token per sequence, so the
stages of a pipeline would take turns, each idle (pp-1)/pp of the time, unless the scheduler kept
pp batches in flight, which this batcher does not.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from typing import Any


def serve_tensor_parallel(
    args: argparse.Namespace,
    api_key: str | None,
    listen: Callable[[str, int], Any],
    make_app: Callable[[Any], Any],
    tokenizer_for: Callable[[Any, int], Any],
    context: dict | None = None,
) -> int:
    """Every rank's part of a tensor-parallel server (returns when rank 0's server stops). The
    socket, the app, the tokenizer and the context override are made as ``mtnlg serve`` makes them
    (``mtnlg.cli.infer``)."""
    from mtnlg.checkpoint.directory import resolve_verified
    from mtnlg.cli.engine import tensor_parallel_limits
    from mtnlg.config import ParallelConfig
    from mtnlg.generate.engine import Engine
    from mtnlg.generate.load import load_parallel_for_inference
    from mtnlg.generate.lockstep import Channel, LeaderEngine, RankLost, follow
    from mtnlg.parallel.dims import destroy_distributed
    from mtnlg.serve.app import serve
    from mtnlg.util import dist as rank_info

    tensor_parallel_limits(args)
    checkpoint = resolve_verified(args.checkpoint)
    main = rank_info.rank() == 0
    sock = listen(args.host, args.port) if main else None  # a port that is taken fails before the model loads
    parallel = ParallelConfig(tp=args.tp, timeout_s=args.rank_timeout)
    model, cfg, tokenizer, _ = load_parallel_for_inference(checkpoint, parallel, context)
    try:
        tokenizer = tokenizer_for(tokenizer, cfg.model.vocab_size)
        channel = Channel(args.rank_timeout, on_lost=_stop_server if main else None)
        if not main:
            for stop in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, torchrun's stop: rank 0 tells the others
                signal.signal(stop, signal.SIG_IGN)         # (they stop by themselves once it is gone)
            try:
                follow(Engine(model, tokenizer, args.max_batch_size, config=cfg), channel)
            except RankLost as exc:
                print(f"mtnlg serve: {exc}; this rank stops", file=sys.stderr, flush=True)
                return 1
            return 0
        engine = LeaderEngine(channel, model, tokenizer, args.max_batch_size, config=cfg)
        channel.start_heartbeat()
        print(f"mtnlg serve: {args.tp} tensor-parallel ranks, rank 0 serving", file=sys.stderr, flush=True)
        previous = signal.signal(signal.SIGTERM, _terminated)  # uvicorn raises it again once it has shut down
        try:
            serve(make_app(engine), args.host, args.port, sock=sock)
        except _Terminated:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            channel.close()  # a rank that is gone (torchrun stops rank 0 as soon as it sees one) is named here
    finally:
        destroy_distributed()
    return 0


class _Terminated(Exception):
    """SIGTERM (torchrun stopping its workers, or a service manager): the other ranks are told to stop."""


def _terminated(signum: int, frame: object) -> None:
    raise _Terminated


def _stop_server(message: str) -> None:
    """A rank is gone: rank 0's requests can no longer be answered; say so in one line and exit
    now (requests still waiting get their connections closed), rather than wait on the dead rank."""
    print(f"mtnlg serve: {message}; the server stops", file=sys.stderr, flush=True)
    os._exit(1)
