"""What a run survives, in one process and on small gloo worlds: SIGTERM and SIGUSR1, asynchronous
saves, a full disk, an incomplete step, a locked run directory, a straggler and a hang."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import os
import re
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from mtnlg.checkpoint import training as checkpoint_training
from mtnlg.checkpoint import writer as checkpoint_writer
from mtnlg.checkpoint.directory import write_checksums
from mtnlg.checkpoint.training import NoSpaceError, find_resume_point
from mtnlg.checkpoint.writer import WriterProcess
from mtnlg.config import ModelConfig, build_config
from mtnlg.parallel.dims import init_distributed
from mtnlg.train.build import build_model
from mtnlg.train.metrics import read_log
from mtnlg.train.trainer import Trainer
from mtnlg.util.process import DirectoryInUse, DirectoryLock
from tests.harness.dist import run_world
from tests.harness.training import RandomTokens, make_config, make_trainer, train_losses

STEPS = dict(steps=6, eval_interval=0, save_interval=2, keep_last=0)


def _with_signals(trainer: Trainer, signals: dict[int, int]) -> None:
    """Make ``trainer`` send itself ``signals[step]`` in the middle of that step (after its forward)."""
    step = trainer.train_step

    def train_step():  # noqa: ANN202
        if (signum := signals.get(trainer.state.step + 1)) is not None:
            signal.raise_signal(signum)
        return step()

    trainer.train_step = train_step  # type: ignore[method-assign]


def _steps_when_committed(trainer: Trainer, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Each background commit waits until training has gone past the step it saves (an
    asynchronous save that blocked training would never commit) and records the trainer's step then."""
    commit, seen = checkpoint_training._commit, {}

    def slow_commit(run_dir, target, *args):  # noqa: ANN001, ANN002, ANN202
        saved = int(target.name.split("_")[1])
        deadline = time.monotonic() + 30
        while trainer.state.step <= saved and time.monotonic() < deadline and trainer.state.step < 6:
            time.sleep(0.01)
        seen[target.name] = trainer.state.step
        commit(run_dir, target, *args)

    monkeypatch.setattr(checkpoint_training, "_commit", slow_commit)
    return seen


def test_sigterm_sigusr1_and_async_saves_resume_exactly(tmp_path: Path, small_model_config, monkeypatch) -> None:
    """A: 6 steps with train.async_save, checkpointed every 2 steps while training goes on.
    B: synchronous; SIGUSR1 in step 1 saves step 1 and goes on, SIGTERM in step 3 saves step 3 and
    returns (no exception: the job ends cleanly); resumed, it logs A's losses exactly. A's
    asynchronous step 4 resumed logs A's last two losses exactly."""
    model_cfg = dataclasses.replace(small_model_config, dropout=0.1)
    straight = make_trainer(make_config(model_cfg, tmp_path / "a", **STEPS, async_save=True))
    committed = _steps_when_committed(straight, monkeypatch)
    straight.fit()
    monkeypatch.undo()
    assert committed["step_00000002"] > 2 and committed["step_00000004"] > 4  # training went on meanwhile
    assert (tmp_path / "a" / "latest").read_text() == "step_00000006"
    assert not list((tmp_path / "a").glob(".step_*"))

    cfg_b = make_config(model_cfg, tmp_path / "b", **{**STEPS, "save_interval": 0})
    interrupted = make_trainer(cfg_b)
    _with_signals(interrupted, {1: signal.SIGUSR1, 3: signal.SIGTERM})
    assert interrupted.fit().step == 3
    assert sorted(p.name for p in (tmp_path / "b").glob("step_*")) == ["step_00000001", "step_00000003"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are gone with fit
    resumed = make_trainer(cfg_b)
    assert resumed.resume() == tmp_path / "b" / "step_00000003"
    resumed.fit()
    assert train_losses(tmp_path / "b") == train_losses(tmp_path / "a")

    again = tmp_path / "a-again"
    shutil.copytree(tmp_path / "a", again, ignore=shutil.ignore_patterns("step_00000006"))
    (again / "latest").write_text("step_00000004")
    from_async = make_trainer(make_config(model_cfg, again, **STEPS))
    from_async.resume()
    from_async.fit()
    assert train_losses(again) == train_losses(tmp_path / "a")


def _fill_disk_at(monkeypatch: pytest.MonkeyPatch, step_name: str) -> None:
    """DCP's file writer runs out of space while writing ``step_name`` (a real OSError, which DCP
    wraps); for an asynchronous save, the writer process answers with it (as its answer arrives)."""
    from torch.distributed.checkpoint.filesystem import _FileSystemWriter

    def failing(write):  # noqa: ANN001, ANN202
        def fails_at_step(self, *args):  # noqa: ANN001, ANN202
            if step_name in str(args[0] if isinstance(self, WriterProcess) else self.path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return write(self, *args)
        return fails_at_step

    monkeypatch.setattr(_FileSystemWriter, "write_data", failing(_FileSystemWriter.write_data))
    monkeypatch.setattr(WriterProcess, "write", failing(WriterProcess.write))


@pytest.mark.parametrize("async_save", [False, True])
def test_a_full_disk_stops_with_one_line_and_keeps_the_last_step(
    tmp_path: Path, small_model_config, monkeypatch, async_save: bool
) -> None:
    cfg = make_config(small_model_config, tmp_path, **STEPS, async_save=async_save)
    trainer = make_trainer(cfg)
    _fill_disk_at(monkeypatch, "step_00000004")
    with pytest.raises(NoSpaceError) as failed:
        trainer.fit()
    assert str(failed.value) == f"cannot save step 4 to {tmp_path}: no space left on device (step 2 is kept)"
    assert (tmp_path / "latest").read_text() == "step_00000002" and not list(tmp_path.glob(".step_*"))
    monkeypatch.undo()
    point = find_resume_point(tmp_path)
    assert point is not None and point.step_dir.name == "step_00000002"


class _NotStarted:
    """A writer process that is never asked to write (the save falls back before), so none is started."""

    def close(self) -> None:
        pass


def test_too_small_a_dev_shm_says_what_it_needs_and_the_run_saves_synchronously(
    tmp_path: Path, small_model_config, monkeypatch, capsys
) -> None:
    """/dev/shm with 1 MiB free (Docker's default is 64 MB) and two ranks on the node: the first
    asynchronous save says in one line what they need and how to get it; the run saves on, synchronously."""
    disk_usage = shutil.disk_usage

    def shm_1_mib(path):  # noqa: ANN001, ANN202
        usage = disk_usage(path)
        return usage._replace(free=1 << 20) if Path(path) == checkpoint_writer.SHARED_MEMORY else usage

    monkeypatch.setattr(checkpoint_writer, "WriterProcess", _NotStarted)
    monkeypatch.setattr(shutil, "disk_usage", shm_1_mib)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    trainer = make_trainer(make_config(small_model_config, tmp_path, steps=3, eval_interval=0, save_interval=2,
                                      async_save=True))
    trainer.fit()
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "/dev/shm" in line]
    need = re.fullmatch(r"warning: cannot stage step 2's checkpoint in /dev/shm for train.async_save: it needs "
                        r"([\d.]+) MiB \(2 ranks of a node\), 1.0 MiB is free: enlarge it \(docker run "
                        r"--shm-size=2g\) or set train.async_save=false; this run saves synchronously", line)
    assert need and float(need.group(1)) > 1, line
    assert trainer.writer is None
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert not list(tmp_path.glob(".step_*"))


def test_resume_skips_a_step_without_train_state_or_trainer_file(tmp_path: Path, small_model_config) -> None:
    """A tool that rewrote a step without its training state (checksums rewritten too): --resume falls
    back to the previous complete step instead of failing inside the loader."""
    make_trainer(make_config(small_model_config, tmp_path, **{**STEPS, "steps": 4})).fit()
    for step, removed in (("step_00000004", "train_state"), ("step_00000002", "trainer.json")):
        target = tmp_path / step / removed
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        (tmp_path / step / "checksums.json").unlink()
        write_checksums(tmp_path / step, local=True)
        expected = "step_00000002" if step == "step_00000004" else None
        if expected is None:
            with pytest.raises(Exception, match=r"no usable checkpoint.*no train_state.*no trainer\.json"):
                find_resume_point(tmp_path)
            continue
        with pytest.warns(UserWarning, match=r"previous good checkpoint .*step_00000002.*incomplete: no train_state"):
            point = find_resume_point(tmp_path)
        assert point is not None and point.step_dir.name == expected
        trainer = make_trainer(make_config(small_model_config, tmp_path, **{**STEPS, "steps": 4}))
        assert trainer.resume(point).name == expected and trainer.state.step == 2


def test_a_run_directory_is_locked_by_one_live_process(tmp_path: Path) -> None:
    """The holder is named; a lock file left by a dead process is taken over."""
    (tmp_path / ".lock").write_text("999999999 gone-host\n")  # what a killed job leaves behind
    held = DirectoryLock(tmp_path).acquire()
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    with pytest.raises(DirectoryInUse, match=f"^run directory {tmp_path} in use by pid {os.getpid()} on "):
        DirectoryLock(tmp_path).acquire()
    held.release()
    DirectoryLock(tmp_path).acquire().release()


TINY = ModelConfig(vocab_size=300, seq_len=32, n_layers=2, hidden=64, n_heads=4, padded_vocab_multiple=64)


def _dp2_trainer(out: str, *overrides: str) -> Trainer:
    cfg = build_config(overrides=[f"--train.out={out}", "--train.device=cpu", "--train.micro_batch_size=2",
                                  "--train.global_batch_size=4", "--train.eval_interval=0", "--train.save_interval=0",
                                  "--train.peak_flops=1e12", *overrides])
    cfg.model = dataclasses.replace(TINY)
    dims = init_distributed(cfg.parallel, "cpu")
    return Trainer(cfg, build_model(cfg, dims.device, dims), RandomTokens(64, TINY.seq_len, TINY.vocab_size),
                   dims=dims, progress=False)


def _rank_1_sleeps(out: str) -> tuple[list[dict], str]:
    """dp=2 (FSDP): rank 1's forward sleeps 0.2 s; the log records of rank 0 and what it printed."""
    import torch.distributed as dist

    trainer = _dp2_trainer(out, "--train.steps=4", "--train.log_interval=2")
    if dist.get_rank() == 1:
        loss = trainer._loss

        def slow_loss(batch: torch.Tensor) -> torch.Tensor:
            time.sleep(0.2)
            return loss(batch)

        trainer._loss = slow_loss  # type: ignore[method-assign]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        trainer.fit()
    return (read_log(Path(out) / "log.jsonl") if dist.get_rank() == 0 else []), printed.getvalue()


def test_the_straggler_report_names_the_slow_rank(tmp_path: Path) -> None:
    """Rank 0 waits for rank 1 inside FSDP's collectives every micro-batch: its busy time excludes
    that wait, so the sleeping rank 1 is the slowest, and named."""
    records, printed = run_world(_rank_1_sleeps, 2, str(tmp_path / "run"), timeout=60)[0]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["slowest_rank"] for r in train] == [1, 1]
    last = train[-1]  # steps 3 and 4 (the first interval holds the first step's warm-up on both ranks)
    assert last["step_time_max"] > 0.2 > last["step_time_min"]  # one micro-batch a step, each 0.2 s late
    assert "warning: step 4: rank 1 is a straggler: busy 0." in printed


def _rank_1_skips_a_collective(out: str) -> None:
    """Rank 1 skips the all-reduce rank 0 waits in, and is then stuck elsewhere (a sleep)."""
    import torch.distributed as dist

    trainer = _dp2_trainer(out, "--train.steps=1", "--parallel.timeout_s=3")
    err = open(Path(out) / f"stderr_{dist.get_rank()}.txt", "w", buffering=1)  # noqa: SIM115 - os._exit ends it
    with contextlib.redirect_stderr(err), trainer.collectives:
        if dist.get_rank() == 0:
            dist.all_reduce(torch.ones(1))
        else:
            threading.Event().wait(60)


def test_a_hang_writes_every_ranks_stacks_and_collectives(tmp_path: Path) -> None:
    """Both ranks write their stacks and last collectives within the timeout plus a second or two,
    and say where; the world ends (the rank outside any collective too)."""
    started = time.monotonic()
    with pytest.raises(AssertionError, match="exited with codes"):
        run_world(_rank_1_skips_a_collective, 2, str(tmp_path), timeout=60)
    assert time.monotonic() - started < 3 + 10
    stacks = {r: (tmp_path / "hangs" / f"rank_0000{r}.txt").read_text() for r in (0, 1)}
    assert "waited more than parallel.timeout_s=3 s in all_reduce" in stacks[0].splitlines()[0]
    assert "another rank reported a hang: rank 0" in stacks[1].splitlines()[0]
    assert "_rank_1_skips_a_collective" in stacks[0] and "_rank_1_skips_a_collective" in stacks[1]
    assert "all_reduce over 2 ranks" in stacks[0]
    err = (tmp_path / "stderr_0.txt").read_text()
    assert f"rank 0: the job hangs (waited more than parallel.timeout_s=3 s in all_reduce); Python stacks and " \
           f"the last collectives in {tmp_path / 'hangs' / 'rank_00000.txt'}" in err
