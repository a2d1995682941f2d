"""How an asynchronous save writes in the background (``AsyncWriter``), and the process that writes
this rank's checkpoint files, so that serializing them never holds the training process's
interpreter lock (``WriterProcess``).

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

It also hashes the files it wrote (``WriterProcess.take_digests``), so that ``checksums.json``
does not read 1.5 GB back in the training process. And it runs in a session of its own at a lower
priority (``_detach``). Where the kernel shares the CPU between sessions (``sched_autogroup_enabled``,
the default of many distributions' kernels), every process of a session draws on the session's
share: a writer in the training process's session spends training's CPU time, however idle the
training process's interpreter lock. In a session of its own, whose share is niced below the
others', it takes what the other sessions leave; where the CPU is shared between processes
instead, its own niceness lets training go first. A session of its own also keeps the terminal's
Ctrl-C (and torchrun's signal to its worker's process group) from ending a write in the middle:
the writer ends when its training process has ended.

Staging in shared memory needs room in ``/dev/shm`` (Docker's default is 64 MB): the first save
checks it and says in one line what is needed (``AsyncWriter.check_space``).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future
from torch.utils._pytree import tree_leaves

from mtnlg.checkpoint.directory import CheckpointError
from mtnlg.util import dist as rank_info
from mtnlg.util.fmt import human_bytes
from mtnlg.util.fs import sha256
from mtnlg.util.process import exit_with_parent

_STOP, _READY = "stop", "ready"
NICENESS = 10  # the writer's priority below training's, where processes share the CPU


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
        self.digests: dict[Path, str] = {}  # SHA-256 of every file written and not yet taken

    def write(self, path: Path, plan: SavePlan, items: list[tuple[WriteItem, Any]],
              options: dict[str, Any]) -> list[WriteResult]:
        """Write ``items`` (write item, tensor or bytes) as ``plan`` says into directory ``path``;
        the files' digests are kept for ``take_digests``."""
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
        results, digests = answer
        self.digests.update({path / name: digest for name, digest in digests.items()})
        return results

    def take_digests(self, directory: Path) -> dict[str, str]:
        """The digests of the files written under ``directory``, by path relative to it (and forgotten
        here): what ``write_checksums`` then need not read again."""
        taken = {p: d for p, d in self.digests.items() if p.is_relative_to(directory)}
        for p in taken:
            del self.digests[p]
        return {str(p.relative_to(directory)): d for p, d in taken.items()}

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
    """The writer process: answer each request with its write results and the written files'
    digests (or the exception)."""
    _detach()
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
            results = writer.write_data(plan, _Staged(items)).wait()  # a torch Future: its value
            names = sorted({result.storage_data.relative_path for result in results})
            answer: Any = (results, {name: sha256(Path(path) / name) for name in names})
        except BaseException as exc:  # noqa: BLE001 - sent to the training process, which raises it
            answer = exc
        del items, request  # the shared memory is the trainer's to reuse
        try:
            conn.send(answer)
        except Exception as exc:  # noqa: BLE001 - an exception that does not pickle: its text
            conn.send(RuntimeError(f"{type(answer).__name__}: {answer} ({exc})"))


def _detach() -> None:
    """A session (and so a kernel autogroup) of this process's own, and a lower priority than
    training's, both for the process and for its autogroup (the weight the kernel gives the group
    against the other sessions'): the writer then takes CPU time that training leaves idle rather
    than training's. Where either is refused, the process writes as it is."""
    try:
        os.setsid()
    except OSError:
        pass
    else:  # the autogroup is this process's alone now, not the training process's
        with contextlib.suppress(OSError):
            Path("/proc/self/autogroup").write_text(str(NICENESS), encoding="utf-8")
    with contextlib.suppress(OSError):
        os.nice(NICENESS)


# How the background write is done (``AsyncWriter.kind``): "process", the state staged in shared
# memory and written by a process of this rank's own (mtnlg.checkpoint.writer); "thread", DCP's
# writer thread in the training process; "dcp-process", DCP's AsyncCheckpointerType.PROCESS (needs a
# process group). benchmarks/checkpoint.py measures the three side by side (figures in
# docs/fault-tolerance.md: on a shared 2-vCPU machine none meets the 20% target).
ASYNC_KINDS = ("process", "thread", "dcp-process")
SHARED_MEMORY = Path("/dev/shm")  # where torch's shared memory lives (shm_open) on Linux


class SharedMemoryError(CheckpointError):
    """The state to stage does not fit in /dev/shm; the message (one line) says what does."""


@dataclass
class AsyncWriter:
    """What asynchronous saves share: one background thread (so at most one commit runs at a
    time), DCP's stager (pinned CPU memory on CUDA; shared memory for a writer process), a gloo
    group of every rank for the background collectives (None in one process) and, for ``kind``
    "process", the writer process. Built on every rank together; ``close`` at the end."""

    group: Any
    stager: Any
    executor: ThreadPoolExecutor
    kind: str = "process"
    process: WriterProcess | None = None
    checked: bool = False  # the room in /dev/shm, before the first staging

    @classmethod
    def create(cls, pinned: bool, kind: str = "process") -> AsyncWriter:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        if kind not in ASYNC_KINDS:
            raise ValueError(f"unknown asynchronous writer {kind!r}: one of {', '.join(ASYNC_KINDS)}")
        if kind == "dcp-process" and not rank_info.distributed():
            raise ValueError("DCP's process-based asynchronous save needs a process group")
        if kind == "process" and multiprocessing.current_process().daemon:  # it may not start processes
            warnings.warn("a daemonic process cannot start a checkpoint writer process: DCP's writer thread "
                          "writes in the background instead", stacklevel=2)
            kind = "thread"
        group = dist.new_group(backend="gloo") if rank_info.distributed() else None
        stager = DefaultStager(StagingOptions(pinned, kind != "thread", False, False))
        process = WriterProcess() if kind == "process" else None
        return cls(group, stager, ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer"), kind, process)

    def save_options(self, path: Path) -> dict[str, Any]:
        """The arguments of ``dcp.async_save`` that choose the writer."""
        if self.process is not None:
            return {"storage_writer": ProcessFileWriter(path, self.process)}
        if self.kind == "dcp-process":
            return {"async_checkpointer_type": AsyncCheckpointerType.PROCESS}
        return {}

    def check_space(self, state: Any, step: int) -> None:
        """Before the first staging in shared memory, raise SharedMemoryError (on every rank, which
        agree) when /dev/shm has no room for the state of this node's ranks. Later saves reuse the
        memory the first one staged in, which /dev/shm then counts as used."""
        if self.checked or self.kind == "thread" or not SHARED_MEMORY.is_dir():
            return
        self.checked = True
        tensors = [t.to_local() if hasattr(t, "to_local") else t for t in tree_leaves(state) if torch.is_tensor(t)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # ranks of this node, each staging its own
        need, free = sum(storages.values()) * local_ranks, shutil.disk_usage(SHARED_MEMORY).free
        worst = torch.tensor([float(need), float(-free)], dtype=torch.float64)
        if self.group is not None:
            dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=self.group)
        need, free = int(worst[0]), int(-worst[1])
        if need > free:
            ranks = f" ({local_ranks} ranks of a node)" if local_ranks > 1 else ""
            raise SharedMemoryError(
                f"cannot stage step {step}'s checkpoint in {SHARED_MEMORY} for train.async_save: it needs "
                f"{human_bytes(need)}{ranks}, {human_bytes(free)} is free: enlarge it (docker run "
                f"--shm-size={-(-need // (1 << 30)) + 1}g) or set train.async_save=false")

    def digests(self, staging: Path) -> dict[str, str] | None:
        """The digests of the data files the writer process wrote into ``staging`` (None: no process)."""
        return None if self.process is None else self.process.take_digests(staging)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.stager.close()
        if self.process is not None:
            self.process.close()
