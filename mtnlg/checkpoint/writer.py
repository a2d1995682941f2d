"""A process that writes this rank's checkpoint files, so that serializing them never holds the
training process's interpreter lock.

DCP's thread-based asynchronous save ``torch.save``-s every tensor into a Python stream from a
thread of the training process: while it runs, that thread and training take turns at the
interpreter lock, and on a machine without spare cores the steps during the write slow down by
about the write's length. Here DCP still plans and commits in a thread of the training process
(its collectives, ``.metadata``), but the state is staged in shared memory and ``write_data`` hands
the staged tensors to ``WriterProcess``, a spawned process, which writes ``__R_0.distcp`` with DCP's
own ``FileSystemWriter`` and sends back the write results. The training process only waits on a
pipe meanwhile. The tensors cross as shared-memory handles (``torch.multiprocessing``): no copy.

The writer process ends with its parent (``exit_with_parent``): a training process killed with
``kill -9`` leaves no writer behind to fill a staging directory that the next job reuses.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from mtnlg.util.process import exit_with_parent

_STOP, _READY = "stop", "ready"


class WriterProcessError(RuntimeError):
    """The writer process died (killed, out of memory) before it answered."""


class WriterProcess:
    """One spawned process that writes DCP data files on request, one request at a time.

    Started when the trainer is built (its interpreter and torch take seconds to start, which
    would otherwise fall on the first save); ``close`` at the end of the job."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, os.getpid()), daemon=True,
                                   name="checkpoint-writer")
        self.process.start()
        child.close()  # a dead writer then reads as EOF here instead of a wait for ever
        self.lock = threading.Lock()
        self.ready = False  # the process has started and said so (its first message)

    def write(self, path: Path, plan: SavePlan, items: list[tuple[WriteItem, Any]],
              options: dict[str, Any]) -> list[WriteResult]:
        """Write ``items`` (write item, tensor or bytes) as ``plan`` says into directory ``path``."""
        with self.lock:
            try:
                if not self.ready:
                    self.ready = self.conn.recv() == _READY
                self.conn.send((str(path), plan, items, options))
                answer = self.conn.recv()
            except (EOFError, OSError) as exc:
                self.process.join(1)
                raise WriterProcessError(f"the checkpoint writer process (pid {self.process.pid}) died "
                                         f"(exit code {self.process.exitcode})") from exc
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def close(self) -> None:
        """Stop the process (a write in flight was waited for by the caller); one still starting
        (it never wrote) is killed rather than waited for."""
        with self.lock:
            if self.process.is_alive() and (self.ready or self.conn.poll()):
                try:
                    self.conn.send(_STOP)
                except OSError:
                    pass
                self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()


class ProcessFileWriter(FileSystemWriter):
    """DCP's ``FileSystemWriter`` whose data files are written by a ``WriterProcess``: planning,
    ``.metadata`` and everything else stay as DCP does them, in the calling process."""

    def __init__(self, path: str | os.PathLike, writer: WriterProcess, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.writer = writer

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        items = [(item, planner.resolve_data(item)) for item in plan.items]
        options = {"single_file_per_rank": self.single_file_per_rank, "sync_files": self.sync_files,
                   "thread_count": self.thread_count, "serialization_format": self.serialization_format}
        done: Future[list[WriteResult]] = Future()
        done.set_result(self.writer.write(Path(self.path), plan, items, options))
        return done


class _Staged:
    """The one method of a planner that ``FileSystemWriter.write_data`` calls, over the staged data."""

    def __init__(self, items: list[tuple[WriteItem, Any]]) -> None:
        self.data = {item.index: data for item, data in items}

    def resolve_data(self, item: WriteItem) -> Any:
        return self.data[item.index]


def _serve(conn: Any, parent: int) -> None:
    """The writer process: answer each request with its write results (or the exception)."""
    torch.set_num_threads(1)
    if os.getppid() != parent:  # the parent died while this process started
        os._exit(1)
    exit_with_parent(name="training process")
    conn.send(_READY)
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request == _STOP:
            return
        path, plan, items, options = request
        try:
            writer = FileSystemWriter(path, **options)
            answer: Any = writer.write_data(plan, _Staged(items)).wait()  # a torch Future: its value
        except BaseException as exc:  # noqa: BLE001 - sent to the training process, which raises it
            answer = exc
        del items, request  # the shared memory is the trainer's to reuse
        try:
            conn.send(answer)
        except Exception as exc:  # noqa: BLE001 - an exception that does not pickle: its text
            conn.send(RuntimeError(f"{type(answer).__name__}: {answer} ({exc})"))
