"""`mtnlg train` as a cluster treats it: a second job on a running job's directory, a launcher
killed under its ranks, and kill -9 while an asynchronous checkpoint is being written.

(A rank killed and restarted by ``torchrun --max-restarts`` is in tests/parallel/test_parallel_train.py,
which compares it with the dp=2 run it already has.)"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtnlg.checkpoint.directory import verify_checksums
from mtnlg.checkpoint.training import find_resume_point
from mtnlg.cli import main
from tests.harness.cli import finish, small_run_flags, start_torchrun

TRAIN = [*small_run_flags(n_layers=2, micro_batch_size=2, eval_iters=1), "--train.eval_interval=0"]


def _read_until(proc: subprocess.Popen, text: str, seen: str = "") -> str:
    assert proc.stdout is not None
    while text not in seen:
        line = proc.stdout.readline()
        assert line, f"the job ended before {text!r}: {seen[-3000:]}"
        seen += line
    return seen


def _latest(run: Path) -> str | None:
    return (run / "latest").read_text() if (run / "latest").is_file() else None


def _gone(pid: int) -> bool:
    """Exited (a zombie nobody reaps counts: it runs no more)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_a_second_job_is_refused_and_the_ranks_end_with_their_launcher(
    train_data_flags: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """While a torchrun job trains in RUN, `mtnlg train --out RUN` exits 1 with one line naming the
    job's rank 0, and the job goes on checkpointing; then SIGKILL of the torchrun launcher alone
    ends its rank within seconds (before, it trained on with nobody to stop it)."""
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    run = tmp_path / "run"
    args = ["train", *train_data_flags, *TRAIN, "--train.steps=100000", "--train.save_interval=10", "--out", str(run)]
    proc = start_torchrun(args, nproc=1)
    try:
        _read_until(proc, "step 2/")
        (worker,) = [int(pid) for pid in os.popen(f"pgrep -P {proc.pid}").read().split()]
        assert main(args) == 1
        assert capsys.readouterr().err == (f"mtnlg train: run directory {run} in use by pid {worker} "
                                           f"on {socket.gethostname()}\n")
        refused_at = _latest(run)
        while _latest(run) == refused_at:  # the first job saves on, untouched
            _read_until(proc, "\n")
        point = find_resume_point(run)
        assert point is not None and point.step_dir.name == _latest(run)
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        while not _gone(worker) and time.monotonic() - killed < 10:
            time.sleep(0.1)
        assert _gone(worker), "the rank outlived its launcher by 10 s"
        assert time.monotonic() - killed < 5
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def test_kill_9_during_asynchronous_saves_leaves_a_loadable_checkpoint(
    train_data_flags: list[str], tmp_path: Path
) -> None:
    """Three jobs of one command line (--resume=auto, a checkpoint every step written in the
    background by a writer process), each killed at a random moment once it has committed a
    checkpoint: after each, the newest checkpoint is complete and passes its checksums, the next
    job resumes it, and the writer process has ended with its job (it writes into nothing after)."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "mtnlg", "train", *train_data_flags, *TRAIN, "--model.hidden=128",
            "--train.steps=100000", "--train.save_interval=1", "--train.keep_last=2", "--train.async_save=true",
            "--resume=auto", "--out", str(run)]
    rng, resumed = random.Random(), []
    for _ in range(3):
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        before = _latest(run)
        seen = _read_until(proc, "step ")
        step = _read_until(proc, "/100000", seen)
        deadline = time.monotonic() + 120  # the writer process starts in the background (seconds)
        while _latest(run) == before and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(rng.uniform(0.3, 1.5))
        writers = [int(pid) for pid in os.popen(f"pgrep -P {proc.pid}").read().split()]
        proc.kill()
        killed = time.monotonic()
        while not all(_gone(pid) for pid in writers) and time.monotonic() - killed < 10:
            time.sleep(0.1)
        assert writers and all(_gone(pid) for pid in writers), f"writer processes {writers} outlived their job"
        out = step + finish(proc, timeout=30)
        resumed.append(out)
        point = find_resume_point(run)
        assert point is not None, out[-2000:]
        verify_checksums(point.step_dir)
        assert (point.step_dir / "train_state" / ".metadata").is_file() and (point.step_dir / "trainer.json").is_file()
    assert "starting from step 0" in resumed[0]
    assert all("resuming from" in out for out in resumed[1:])
