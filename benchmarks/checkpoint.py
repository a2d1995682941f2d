"""How long a checkpoint stops training: a synchronous save vs ``train.async_save``'s writers, side by side.

One trainer (gpt2-small, 124M parameters, AdamW state: 1.5 GB to write) trains steps of one
sequence of T tokens, in a gloo world of one process (DCP's process-based writer needs a process
group; every variant runs in the same world). Per round, in turn:

* sync: ``Trainer.save`` with no background writer: the time it blocks is the stall;
* for each asynchronous writer (``mtnlg.checkpoint.writer.ASYNC_KINDS``: "process", the state
  staged in shared memory and written by mtnlg's writer process; "thread", DCP's writer thread in
  the training process; "dcp-process", DCP's ``AsyncCheckpointerType.PROCESS``): ``--steps``
  steps without a save (their median is one step's time), then ``Trainer.save`` (it returns once
  the state is copied to CPU memory), then steps until the background write has committed, then
  ``--steps`` plain steps again. The stall is the save call plus the time the steps during the
  write took beyond as many plain steps (the median of those before and after), plus any wait for
  a write that outlasts them.

Each writer saves once before the rounds (its process starts, its staging memory is allocated).
The order of the writers turns from round to round. The target is an asynchronous stall of at most
20% of the synchronous save. Figures depend on the disk and on what else runs (the load average
is recorded, at the start and the end).

    .venv/bin/python benchmarks/checkpoint.py [--rounds 2] [--steps 3] [--seq-len 64] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from run_info import run_info
from torch.distributed.elastic.utils.distributed import get_free_port

from mtnlg.checkpoint.writer import ASYNC_KINDS, AsyncWriter
from mtnlg.config import Config, TrainConfig
from mtnlg.config.presets import get_preset
from mtnlg.train.build import build_model
from mtnlg.train.trainer import Trainer


class RandomTokens:
    """Random token samples (seq_len + 1 each): the save does not depend on the text."""

    def __init__(self, n: int, seq_len: int, vocab: int) -> None:
        self.data = torch.randint(0, vocab, (n, seq_len + 1), generator=torch.Generator().manual_seed(0)).numpy()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):  # noqa: ANN204
        return self.data[i]


def make_trainer(out: Path, seq_len: int) -> Trainer:
    model = dataclasses.replace(get_preset("gpt2-small"), seq_len=seq_len, dropout=0.0)
    train = TrainConfig(micro_batch_size=1, global_batch_size=1, steps=10_000, eval_interval=0, save_interval=0,
                        keep_last=1, peak_flops=1e12, out=str(out), device="cpu", async_save=True)
    cfg = Config(model=model, train=train).validate()
    return Trainer(cfg, build_model(cfg, torch.device("cpu")), RandomTokens(256, seq_len, model.vocab_size),
                   progress=False)


def timed_steps(trainer: Trainer, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    return times


def async_round(trainer: Trainer, steps: int) -> dict:
    """Plain steps, the save call, steps until the write has committed (at most 20), any wait left,
    and plain steps again: a plain step's time is the median of those before and after the write,
    so that a change of the machine's load during the round counts less."""
    before = timed_steps(trainer, steps)
    start = time.perf_counter()
    trainer.save(weights=False)
    call_s = time.perf_counter() - start
    during: list[float] = []
    while trainer.pending is not None and not trainer.pending.done() and len(during) < 20:
        during += timed_steps(trainer, 1)
    start = time.perf_counter()
    trainer.wait_for_save()
    wait_s = time.perf_counter() - start
    step_s = statistics.median(before + timed_steps(trainer, steps))
    slowdown = sum(during) - len(during) * step_s
    return {"step_s": step_s, "save_call_s": call_s, "steps_during_write": len(during), "step_slowdown_s": slowdown,
            "final_wait_s": wait_s, "stall_s": call_s + max(slowdown, 0.0) + wait_s}


def sync_save(trainer: Trainer) -> float:
    writer, trainer.writer = trainer.writer, None
    start = time.perf_counter()
    trainer.save(weights=False)
    trainer.writer = writer
    return time.perf_counter() - start


def one_process_world() -> None:
    """A gloo process group of this process alone (what DCP's process-based writer needs)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(get_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)


def summary(rounds: list[dict]) -> dict:
    sync = statistics.median(r["sync_save_s"] for r in rounds)
    out: dict = {"median_sync_save_s": sync}
    for kind in ASYNC_KINDS:
        stall = statistics.median(r[kind]["stall_s"] for r in rounds)
        call = statistics.median(r[kind]["save_call_s"] for r in rounds)
        fractions = [r[kind]["stall_s"] / r["sync_save_s"] for r in rounds]  # each round against its own sync save
        out[kind] = {"median_stall_s": stall, "stall_fraction_of_sync": stall / sync,
                     "round_stall_fractions": fractions, "median_round_stall_fraction": statistics.median(fractions),
                     "median_save_call_s": call, "save_call_fraction_of_sync": call / sync}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="plain steps before and after each write")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--out", help="run directory (default: a temporary one); its disk is what is measured")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "checkpoint.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # training on one core, the writer on the other
    load = os.getloadavg()
    one_process_world()
    with tempfile.TemporaryDirectory(dir=args.out) as out:
        trainer = make_trainer(Path(out), args.seq_len)
        trainer._close_writer()
        writers = {kind: AsyncWriter.create(False, kind) for kind in ASYNC_KINDS}
        timed_steps(trainer, 2)  # warm-up: the heap grows to its peak
        for writer in writers.values():  # warm-up: each writer's process and staging memory
            trainer.writer = writer
            trainer.save(weights=False)
            trainer.wait_for_save()
        rounds = []
        for i in range(args.rounds):
            result: dict = {"sync_save_s": sync_save(trainer)}
            for kind in ASYNC_KINDS[i % 3:] + ASYNC_KINDS[:i % 3]:
                trainer.writer = writers[kind]
                result[kind] = async_round(trainer, args.steps)
            rounds.append(result)
            print(json.dumps(rounds[-1]), file=sys.stderr)
        state_bytes = sum(f.stat().st_size for f in Path(out).glob("step_*/train_state/*.distcp"))
        for writer in writers.values():
            writer.close()
    result = {
        "benchmark": "checkpoint stall: synchronous save vs train.async_save's writers (gpt2-small, CPU, fp32, AdamW)",
        "seq_len": args.seq_len, "train_state_bytes": state_bytes, "rounds": rounds, **summary(rounds),
        "target_fraction": 0.2, **run_info(load),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"sync save {result['median_sync_save_s']:.2f} s; " + "; ".join(
        f"{kind}: stall {result[kind]['median_stall_s']:.2f} s ({result[kind]['stall_fraction_of_sync']:.0%}), "
        f"save call {result[kind]['median_save_call_s']:.2f} s" for kind in ASYNC_KINDS) + f" -> {args.json}")


if __name__ == "__main__":
    main()
