"""The checkpoint writer process: DCP's files written by another process from shared memory (in a
session of its own, at a lower priority, hashing what it wrote), its failures raised in the
training process, and its death reported instead of waited for."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from mtnlg.checkpoint.writer import NICENESS, ProcessFileWriter, WriterProcess, WriterProcessError
from mtnlg.util.fs import sha256


class _MissingDirectory(ProcessFileWriter):
    """Plans in ``path`` but has the writer process write into a directory that does not exist."""

    def write_data(self, plan, planner):  # noqa: ANN001, ANN201
        self.path = Path(self.path) / "missing"
        return super().write_data(plan, planner)


def test_the_writer_process_writes_what_dcp_loads_and_reports_its_failures(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    state = {"model": {"w": torch.randn(64, 32, generator=generator), "b": torch.arange(7)},
             "optim": {"step": 3, "lr": 1e-3, "exp_avg": torch.randn(5, generator=generator)}}
    stager = DefaultStager(StagingOptions(False, True, False, False))
    staged = stager.stage(state)  # shared memory: the writer process maps it, nothing is copied
    assert staged["model"]["w"].is_shared()
    writer = WriterProcess()
    try:
        dcp.save(staged, storage_writer=ProcessFileWriter(tmp_path / "a", writer), no_dist=True)
        # its own session (so its own CPU share where the kernel groups by session), nicer than training
        assert os.getsid(writer.process.pid) == writer.process.pid != os.getsid(0)
        stat = Path(f"/proc/{writer.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        assert int(stat[16]) == os.nice(0) + NICENESS  # field 19 of proc(5): the nice value
        autogroup = Path(f"/proc/{writer.process.pid}/autogroup")  # where the kernel has autogroups
        assert not autogroup.is_file() or autogroup.read_text().endswith(f" nice {NICENESS}\n")
        # the digests of what it wrote, for checksums.json, as read back here
        assert writer.take_digests(tmp_path) == {"a/__0_0.distcp": sha256(tmp_path / "a" / "__0_0.distcp")}
        assert writer.take_digests(tmp_path) == {}  # taken once
        loaded = {"model": {"w": torch.zeros(64, 32), "b": torch.zeros(7, dtype=torch.long)},
                  "optim": {"step": 0, "lr": 0.0, "exp_avg": torch.zeros(5)}}
        dcp.load(loaded, checkpoint_id=tmp_path / "a", no_dist=True)
        assert all(torch.equal(loaded["model"][k], state["model"][k]) for k in ("w", "b"))
        assert loaded["optim"]["step"] == 3 and torch.equal(loaded["optim"]["exp_avg"], state["optim"]["exp_avg"])

        with pytest.raises(BaseException) as failed:  # the writer's own exception, raised here (DCP wraps it)
            dcp.save(staged, storage_writer=_MissingDirectory(tmp_path / "b", writer), no_dist=True)
        assert any(isinstance(e, FileNotFoundError) and "missing" in str(e) for e in _chain(failed.value))

        writer.process.kill()  # killed (the OOM killer): the next write says so instead of waiting
        writer.process.join(10)
        with pytest.raises(BaseException) as died:
            dcp.save(staged, storage_writer=ProcessFileWriter(tmp_path / "c", writer), no_dist=True)
        assert any(isinstance(e, WriterProcessError) and f"process (pid {writer.process.pid}) died" in str(e)
                   for e in _chain(died.value))
    finally:
        writer.close()
        stager.close()
    assert not writer.process.is_alive()


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc``, its causes and DCP's per-rank failures."""
    found, todo = [], [exc]
    while todo:
        e = todo.pop()
        found.append(e)
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]
        todo += [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
    return found
