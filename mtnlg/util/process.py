"""A process's claims and ties: an exclusive lock on a directory, and ending with the launcher.

Both guard a run directory against what a cluster does to a job. Two jobs writing one run
directory (a duplicate submission, a resume started while the first job still runs) delete each
other's temporary save directories; ranks whose launcher was killed (the OOM killer, ``kill -9``
of the job's main process) keep training and checkpointing with nobody to stop them.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import IO

LOCK_FILE = ".lock"


class DirectoryInUse(RuntimeError):
    """Another live process holds the directory's lock; the message is the whole answer."""


class DirectoryLock:
    """``DIR/.lock``, held with ``flock`` for as long as this process lives (or until ``release``).

    The kernel drops an ``flock`` when its holder dies however it dies, so a lock file left by a
    killed job is simply taken over; the file's text (``pid host``) only names the holder in the
    refusal. ``flock`` works across the nodes of a cluster on NFSv4 and Lustre (``-o flock``).
    """

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / LOCK_FILE
        self.file: IO[str] | None = None

    def acquire(self) -> DirectoryLock:
        """Take the lock, or raise DirectoryInUse naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().split()
            file.close()
            pid, host = (holder + ["?", "?"])[:2]
            raise DirectoryInUse(f"run directory {self.path.parent} in use by pid {pid} on {host}") from None
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()} {socket.gethostname()}\n")
        file.flush()
        self.file = file
        return self

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the last descriptor drops the flock
            self.file = None


def exit_with_parent(poll_s: float = 0.5, name: str = "launcher") -> threading.Thread:
    """End this process (exit code 1) within ``poll_s`` seconds of its parent's death.

    A daemon thread watches ``os.getppid()``: when the parent dies the process is re-parented
    (to init or a subreaper) and the id changes. This works wherever the parent is, unlike
    ``prctl(PR_SET_PDEATHSIG)``, which fires when the *thread* that forked dies and must be set by
    the child before the parent can die. Nothing is saved: ranks without a launcher cannot agree
    on a step, and the last complete checkpoint is intact by construction.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        print(f"pid {os.getpid()}: the {name} (pid {parent}) is gone: exiting", file=sys.stderr, flush=True)
        os._exit(1)

    thread = threading.Thread(target=watch, name=f"exit-with-{name}", daemon=True)
    thread.start()
    return thread
