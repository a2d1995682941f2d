"""Training-step time of tensor parallelism: tp=1 versus tp=2 (and tp=2 + sequence parallel).

Each layout is launched with ``torchrun`` (the way users run it), on the CPU with gloo or on
GPUs with NCCL. Every rank gets ``cores / ranks`` compute threads, so all layouts use the same
hardware. A step is forward + backward + AdamW on a fixed batch; the communication share is the
time the main thread spends in collectives (issuing and waiting on them), measured with the
torch profiler over a few extra steps, and the collectives per step are counted by DTensor's
``CommDebugMode``.

    python benchmarks/tensor_parallel.py [--device cpu|cuda] [--steps 8]

Writes benchmarks/results/tensor_parallel.json (one entry per device kind). On a 2-core CPU
expect no speed-up: the two ranks split the arithmetic but add an all-reduce per sub-layer over
loopback. tp=1 also runs with one thread, the per-rank budget of tp=2, to separate the effect of
splitting the model from that of threading on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from run_info import run_info

RESULTS = Path(__file__).parent / "results" / "tensor_parallel.json"
COMM_MARKERS = ("c10d", "all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter", "wait_tensor")
MODEL = dict(vocab_size=8192, seq_len=256, n_layers=4, hidden=256, n_heads=8)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _comm_seconds(prof: torch.profiler.profile) -> float:
    """Self time of every collective-related op on the main thread (no double counting)."""
    events = prof.key_averages()
    return sum(e.self_cpu_time_total for e in events if any(m in e.key.lower() for m in COMM_MARKERS)) / 1e6


def worker(args: argparse.Namespace) -> None:
    """One rank (under torchrun): time training steps of the tiny GPT, rank 0 writes the figures."""
    from torch.distributed.tensor.debug import CommDebugMode

    from mtnlg.config import Config, ModelConfig, ParallelConfig
    from mtnlg.model.gpt import GPT
    from mtnlg.parallel.dims import destroy_distributed, init_distributed
    from mtnlg.parallel.parallelize import parallelize
    from mtnlg.parallel.utils import loss_context

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(args.threads)
    cfg = Config(
        model=ModelConfig(**MODEL),
        parallel=ParallelConfig(tp=world, sequence_parallel=args.sequence_parallel),
    )
    dims = init_distributed(cfg.parallel, device=None if args.device == "cuda" else "cpu")
    torch.manual_seed(0)
    model = parallelize(GPT(cfg.model).to(dims.device), dims, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = torch.randint(0, MODEL["vocab_size"], (args.batch, MODEL["seq_len"] + 1), device=dims.device)

    def step() -> None:
        with loss_context(dims):
            model(data[:, :-1], data[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(args.warmup + args.steps):
        _sync(dims.device)
        t0 = time.perf_counter()
        step()
        _sync(dims.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.profile_steps):
            step()
        _sync(dims.device)
        profiled = time.perf_counter() - t0
    with warnings.catch_warnings(), CommDebugMode() as comm:
        warnings.simplefilter("ignore")  # its module tracker's backward hooks warn about integer inputs
        step()
    if dims.is_main:
        Path(args.worker_out).write_text(
            json.dumps(
                {
                    "tp": world,
                    "sequence_parallel": args.sequence_parallel,
                    "threads_per_rank": torch.get_num_threads(),
                    "step_s_median": statistics.median(times),
                    "step_s_all": times,
                    "tokens_per_s": args.batch * MODEL["seq_len"] / statistics.median(times),
                    "comm_share": _comm_seconds(prof) / profiled if world > 1 else 0.0,
                    "collectives_per_step": {str(k): v for k, v in comm.get_comm_counts().items()},
                }
            )
        )
    destroy_distributed()


def launch(nproc: int, threads: int, args: argparse.Namespace, sequence_parallel: bool = False) -> dict:
    """Run this file's worker under ``torchrun --nproc_per_node=nproc`` and read rank 0's figures."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        flags = {
            "worker-out": out,
            "device": args.device,
            "steps": args.steps,
            "warmup": args.warmup,
            "batch": args.batch,
            "profile-steps": args.profile_steps,
            "threads": threads,
        }
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            __file__,
        ]
        cmd += [f"--{name}={value}" for name, value in flags.items()]
        cmd += ["--sequence-parallel"] if sequence_parallel else []
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, timeout=1800)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--sequence-parallel", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    load_start = os.getloadavg()
    if args.worker_out:
        worker(args)
        return
    cores = os.cpu_count() or 1
    runs = [
        launch(1, cores, args),
        launch(1, 1, args),
        launch(2, max(1, cores // 2), args),
        launch(2, max(1, cores // 2), args, sequence_parallel=True),
    ]
    base = min(r["step_s_median"] for r in runs if r["tp"] == 1)  # the faster threading of one process
    for run in runs:
        run["speedup_vs_best_tp1"] = base / run["step_s_median"]
        print(
            f"tp={run['tp']} sp={run['sequence_parallel']!s:5} threads/rank={run['threads_per_rank']}: "
            f"step {run['step_s_median'] * 1e3:7.1f} ms  {run['tokens_per_s']:8.0f} tok/s  "
            f"speed-up {run['speedup_vs_best_tp1']:.2f}x  communication {run['comm_share']:.0%}"
        )
    result = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
        "cpu_count": cores,
        "machine": platform.platform(),
        "torch": torch.__version__,
        "model": MODEL,
        "batch": args.batch,
        "note": "shared 2-core machine: figures are noisy; tp cannot speed up when ranks share the cores",
        "runs": runs,
        "run": run_info(load_start),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"benchmark": "tensor_parallel"}
    results[args.device] = result  # CPU and GPU figures side by side
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
