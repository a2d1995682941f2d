"""Helpers for tests that run `mtnlg train` end to end: in this process, on forked gloo ranks, or under ``torchrun``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from mtnlg.train.metrics import read_log
from tests.harness.dist import run_world

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def small_run_flags(n_layers: int, micro_batch_size: int, eval_iters: int) -> list[str]:
    """`mtnlg train` flags of a seconds-long run on CPU: 4 sequences of 32 tokens a step, logged every
    step, validated and checkpointed every 5 (steps and output directory are the caller's)."""
    return [
        "--no-progress", "--model.seq_len=32", f"--model.n_layers={n_layers}", "--model.hidden=64",
        "--model.n_heads=4", f"--train.micro_batch_size={micro_batch_size}", "--train.global_batch_size=4",
        "--train.lr=3e-3", "--train.warmup_steps=2", "--train.decay_steps=10", "--train.eval_interval=5",
        f"--train.eval_iters={eval_iters}", "--train.log_interval=1", "--train.save_interval=5",
        "--train.peak_flops=1e12", "--data.split=8,2,0", "--train.device=cpu",
    ]  # fmt: skip


def start_torchrun(args: list[str], nproc: int = 2, launcher: list[str] | None = None) -> subprocess.Popen:
    """``torchrun LAUNCHER --nproc_per_node=N -m mtnlg ARGS`` in its own process group, output piped."""
    return subprocess.Popen(
        [*TORCHRUN, *(launcher or []), f"--nproc_per_node={nproc}", "-m", "mtnlg", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """The rest of ``proc``'s output once it exits; a hang is killed and fails."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"torchrun still running after {timeout} s (a hang?); killed") from None
    return out


def torchrun(args: list[str], nproc: int = 2, timeout: float = 300) -> str:
    """Run ``torchrun ... -m mtnlg ARGS`` to success; its output."""
    proc = start_torchrun(args, nproc)
    out = finish(proc, timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _cli_rank(args: list[str], log_dir: str) -> tuple[int, str]:
    """``mtnlg ARGS`` on this rank, with what torchrun would have set, and its output (fd 1 and 2)."""
    import torch.distributed as dist

    from mtnlg.cli import main

    rank, world_size = dist.get_rank(), dist.get_world_size()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    log = Path(log_dir) / f"rank{rank}.out"
    with log.open("w", encoding="utf-8") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            code = main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
    return code, log.read_text(encoding="utf-8")


def cli_world(args: list[str], nproc: int = 2, timeout: float = 300.0) -> str:
    """``mtnlg ARGS`` on ``nproc`` gloo ranks forked from the forkserver, to success; every rank's output.

    The job ``torchrun --nproc_per_node=N -m mtnlg ARGS`` runs, without the launcher and without
    paying torch's import per rank (seconds each on 2 cores); tests of torchrun's own part (restarts,
    a dead launcher) launch it for real.
    """
    with tempfile.TemporaryDirectory(prefix="mtnlg-cli-") as log_dir:
        results = run_world(_cli_rank, nproc, args, log_dir, timeout=timeout, daemon=False)
    out = "\n".join(text for _, text in results)
    codes = [code for code, _ in results]
    assert codes == [0] * nproc, f"exit codes {codes}:\n{out[-4000:]}"
    return out


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(run / "log.jsonl") if r["kind"] == "train"}


def valid_losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_log(run / "log.jsonl") if r["kind"] == "valid"]


def at_step(run: Path, copy: Path, step: int = 5) -> Path:
    """A copy of ``run`` whose newest checkpoint is ``step``."""
    shutil.copytree(run, copy)
    for later in copy.glob("step_*"):
        if int(later.name.split("_")[1]) > step:
            shutil.rmtree(later)
    (copy / "latest").write_text(f"step_{step:08d}", encoding="utf-8")
    return copy


def rank_pid(proc: subprocess.Popen, rank: int) -> int | None:
    """The pid of the worker of ``rank`` among the torchrun ``proc``'s descendants (by its ``RANK``)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue

    def descends(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == proc.pid:
                return True
        return False

    for pid in parents:
        try:
            if descends(pid) and f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
        except OSError:
            continue
    return None
