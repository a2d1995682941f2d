"""How long a checkpoint stops training: a synchronous save vs ``train.async_save``, gpt2-small on the CPU.

One trainer (gpt2-small, 124M parameters, AdamW state: 1.5 GB to write) trains steps of one
sequence of T tokens. Per round, in this order:

* baseline: ``--steps`` steps without a save; their median is one step's time;
* sync: ``Trainer.save`` with the background writer switched off: the time it blocks is the stall;
* async: ``Trainer.save`` (it returns once the state is copied to CPU memory), then steps until
  the background write has committed. The stall is the save call plus the time those steps took
  beyond as many baseline steps (the writer thread competes with training for the CPU), plus any
  wait for a write that outlasts them.

The target is an async stall of at most 20% of the synchronous save. Figures depend on the disk
and on what else runs (the load average is recorded).

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
from run_info import run_info

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


def async_round(trainer: Trainer, step_s: float) -> dict:
    """The save call, then steps until the write has committed (at most 20), then any wait left."""
    start = time.perf_counter()
    trainer.save(weights=False)
    call_s = time.perf_counter() - start
    steps: list[float] = []
    while trainer.pending is not None and not trainer.pending.done() and len(steps) < 20:
        steps += timed_steps(trainer, 1)
    start = time.perf_counter()
    trainer.wait_for_save()
    wait_s = time.perf_counter() - start
    slowdown = sum(steps) - len(steps) * step_s
    return {"save_call_s": call_s, "steps_during_write": len(steps), "step_slowdown_s": slowdown,
            "final_wait_s": wait_s, "stall_s": call_s + max(slowdown, 0.0) + wait_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="baseline steps per round")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--out", help="run directory (default: a temporary one); its disk is what is measured")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "checkpoint.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # training on one core, the writer thread on the other
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=args.out) as out:
        trainer = make_trainer(Path(out), args.seq_len)
        timed_steps(trainer, 2)  # warm-up: the heap grows to its peak
        rounds = []
        for _ in range(args.rounds):
            step_s = statistics.median(timed_steps(trainer, args.steps))
            writer, trainer.writer = trainer.writer, None
            start = time.perf_counter()
            trainer.save(weights=False)
            sync_s = time.perf_counter() - start
            trainer.writer = writer
            rounds.append({"step_s": step_s, "sync_save_s": sync_s, **async_round(trainer, step_s)})
            print(json.dumps(rounds[-1]), file=sys.stderr)
        trainer._close_writer()
        state_bytes = sum(f.stat().st_size for f in Path(out).rglob("*.distcp"))
    sync = statistics.median(r["sync_save_s"] for r in rounds)
    stall = statistics.median(r["stall_s"] for r in rounds)
    call = statistics.median(r["save_call_s"] for r in rounds)
    result = {
        "benchmark": "checkpoint stall: synchronous save vs train.async_save (gpt2-small, CPU, fp32, AdamW)",
        "seq_len": args.seq_len, "train_state_bytes": state_bytes, "rounds": rounds,
        "median_sync_save_s": sync, "median_async_stall_s": stall, "async_stall_fraction_of_sync": stall / sync,
        "median_async_save_call_s": call, "async_save_call_fraction_of_sync": call / sync,
        "target_fraction": 0.2,
        **run_info(load),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"sync save {sync:.2f} s; async: the save call {call:.2f} s ({call / sync:.0%} of it), "
          f"the whole stall {stall:.2f} s ({stall / sync:.0%}) -> {args.json}")


if __name__ == "__main__":
    main()
