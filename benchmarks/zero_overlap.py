"""How much of ZeRO-1/2's gradient reduction the backward pass hides, on 2 gloo CPU ranks.

Each rank (one thread) runs the real ``Trainer``'s forward and backward of one micro-batch under
``parallel.zero`` 1 and 2, dp=2, and waits for the gradient reduction, three ways:

* ``compute``: no reduction at all (the backward alone);
* ``serial``: every bucket launched after backward (``ZeroAdamW.overlap = False``);
* ``overlapped``: buckets launched by the gradient hooks during backward (the default).

``hidden = (serial - overlapped) / (serial - compute)``: the share of the reduction's exposed time
that overlapping removes. Medians over ``--steps``. On a 2-core machine the ranks' compute and
gloo's communication threads share the cores, so this is a lower bound on what a GPU with its own
copy engines gets; NCCL figures come from ``benchmarks/gpu.py --zero`` on a GPU node.

    python benchmarks/zero_overlap.py [--steps 10] [--out benchmarks/results/zero_overlap.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_info import run_info  # noqa: E402
from train import RandomTokens  # noqa: E402

from mtnlg.config import Config, ModelConfig, ParallelConfig, TrainConfig  # noqa: E402
from mtnlg.parallel.dims import ParallelDims  # noqa: E402
from mtnlg.parallel.zero import ZeroAdamW  # noqa: E402
from mtnlg.train.build import build_model  # noqa: E402
from mtnlg.train.trainer import Trainer  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "zero_overlap.json"
MODEL = ModelConfig(vocab_size=8192, seq_len=128, n_layers=6, hidden=384, n_heads=6)


def config(zero: int, bucket_mb: float = 4.0) -> Config:
    """The benchmark's run: dp=2 with ZeRO stage ``zero``, one micro-batch of 4 sequences per rank."""
    return Config(model=MODEL, parallel=ParallelConfig(zero=zero, bucket_mb=bucket_mb),
                  train=TrainConfig(micro_batch_size=4, global_batch_size=8, peak_flops=1e12, device="cpu",
                                    out="unused")).validate()


def _time(trainer: Trainer, mode: str) -> float:
    optimizer = trainer.optimizer
    assert isinstance(optimizer, ZeroAdamW)
    optimizer.overlap = mode == "overlapped"
    optimizer.set_gradient_sync(mode != "compute")
    dist.barrier()
    start = time.perf_counter()
    trainer._forward_backward(1)
    if mode != "compute":
        optimizer.finish_gradient_reduction()
    seconds = time.perf_counter() - start
    optimizer.zero_grad()
    return seconds


def _rank(rank: int, store: str, steps: int, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    results = {}
    for zero in (1, 2):
        cfg = config(zero)
        dims = ParallelDims.from_config(cfg.parallel, 2)
        dims.build_mesh()
        trainer = Trainer(cfg, build_model(cfg, torch.device("cpu"), dims),
                          RandomTokens(256, MODEL.seq_len, MODEL.vocab_size), dims=dims, progress=False)
        modes = ("compute", "serial", "overlapped")
        times: dict[str, list[float]] = {m: [] for m in modes}
        for step in range(steps + 2):  # 2 warm-up rounds
            for mode in modes:
                seconds = _time(trainer, mode)
                if step >= 2:
                    times[mode].append(seconds)
        median = {m: statistics.median(t) for m, t in times.items()}
        exposed = median["serial"] - median["compute"]
        results[f"zero{zero}"] = {**{f"{m}_s": v for m, v in median.items()},
                                  "hidden": (median["serial"] - median["overlapped"]) / exposed if exposed > 0 else 0.0,
                                  "buckets": len(trainer.optimizer.buckets)}
    if rank == 0:
        out.update(results)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(f"{tmp}/store", args.steps, out), nprocs=2)
        result = {"model": {"n_layers": MODEL.n_layers, "hidden": MODEL.hidden, "seq_len": MODEL.seq_len},
                  "dp": 2, "backend": "gloo", **dict(out), "run": run_info(load_start)}
    for zero in ("zero1", "zero2"):
        r = result[zero]
        print(f"{zero}: backward {r['compute_s'] * 1e3:.0f} ms, + reduction after it {r['serial_s'] * 1e3:.0f} ms, "
              f"overlapped {r['overlapped_s'] * 1e3:.0f} ms: {r['hidden']:.0%} of the reduction hidden")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
