"""What keeps a run going, or makes its failure legible, when a cluster does what clusters do.

- ``guard_run``: the run directory is this job's alone (``DirectoryLock``), ranks end with their
  ``torchrun`` launcher (``exit_with_parent``), and on CUDA the NCCL flight recorder is on.
- ``CollectiveMonitor``: every collective this process enters (the last ones are kept) and the
  time it waits for its peers. A wait longer than ``parallel.timeout_s`` is a hang: every rank
  writes its Python stacks and those collectives to ``RUN/hangs/rank_XXXXX.txt`` and exits.
- ``StragglerReport``: the ranks' busy time per step (the step minus its waits for peers) each log
  interval: min / median / max and the slowest rank, with a warning naming a rank far above the median.

Preemption (SIGTERM, SIGUSR1) is ``mtnlg.train.limits.StopRequest``; asynchronous checkpoints
are ``mtnlg.checkpoint.training.save_training_checkpoint_async``.
"""

from __future__ import annotations

import collections
import faulthandler
import functools
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mtnlg.util import dist as rank_info
from mtnlg.util.process import DirectoryLock, exit_with_parent

HANG_DIR = "hangs"
_HANG_KEY = "mtnlg/hang"

# The NCCL flight recorder (a ring buffer of every NCCL collective, dumped on a timeout): set
# before the process group is made; the dump is RUN/hangs/nccl/nccl_trace_rank_<R> (a directory of
# its own: torch.distributed.flight_recorder.fr_trace reads every file of the one it is given).
FLIGHT_RECORDER = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}
FLIGHT_RECORDER_FILE = "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"


def guard_run(out: str | Path, device: torch.device) -> DirectoryLock | None:
    """Before a run writes anything: rank 0 locks ``out``; under torchrun every rank exits when its
    launcher dies; on CUDA the flight recorder's variables are set (unless given). The lock is
    returned for ``release`` (None on the other ranks)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # set by torchrun for its workers
        exit_with_parent(name="torchrun launcher")
    if device.type == "cuda":
        for name, value in FLIGHT_RECORDER.items():
            os.environ.setdefault(name, value)
        os.environ.setdefault(FLIGHT_RECORDER_FILE, str(Path(out).absolute() / HANG_DIR / "nccl" / "nccl_trace_rank_"))
        (Path(out) / HANG_DIR / "nccl").mkdir(parents=True, exist_ok=True)
    return DirectoryLock(out).acquire() if rank_info.is_main() else None


# -- collectives -------------------------------------------------------------------------------------

# Not isend/irecv: P2POp checks its op *is* torch.distributed.isend or irecv; pipelines send
# through batch_isend_irecv.
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
                "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "barrier", "all_to_all",
                "all_to_all_single", "gather", "scatter", "send", "recv", "batch_isend_irecv")
_ACTIVE: list[CollectiveMonitor] = []  # the installed monitor (one per process)


@dataclass
class Entered:
    """One collective as this process called it."""

    seq: int
    op: str
    group_size: int
    at: float  # time.time()
    thread: str


class CollectiveMonitor:
    """Wraps ``torch.distributed``'s collectives and ``Work.wait`` while installed (``with``).

    Synchronous collectives wait through ``Work.wait`` too, so the wrapper of ``wait`` times
    every wait of the main thread, FSDP's included. Functional collectives (tensor parallelism's
    DTensors) wait inside C++ and are not seen; on CUDA a wait returns once the kernel is queued,
    and NCCL's own watchdog and flight recorder (``guard_run``) cover hangs there.
    """

    def __init__(self, out: str | Path, timeout_s: float, keep: int = 64, poll_s: float = 0.5,
                 store_poll_s: float = 2.0) -> None:
        self.out, self.timeout_s, self.poll_s, self.store_poll_s = Path(out), timeout_s, poll_s, store_poll_s
        self.entered: collections.deque[Entered] = collections.deque(maxlen=keep)
        self.seq = 0
        self.wait_seconds = 0.0  # the main thread's, since install
        self.waiting: tuple[float, str] | None = None  # the main thread's current wait: since, op
        self.dumped: Path | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> CollectiveMonitor:
        if _ACTIVE or not rank_info.distributed():
            return self
        _ACTIVE.append(self)
        for name in _COLLECTIVES:
            self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name, self._saved[name]))
        work = dist.distributed_c10d.Work
        self._saved["wait"] = work.wait
        work.wait = self._timed_wait(work.wait)
        threading.Thread(target=self._watch, name="hang-watchdog", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._saved:
            return
        self._stop.set()
        dist.distributed_c10d.Work.wait = self._saved.pop("wait")
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()
        _ACTIVE.remove(self)

    def _wrap(self, name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def entered(*args: Any, **kwargs: Any) -> Any:
            try:
                size = dist.get_world_size(kwargs.get("group"))
            except (RuntimeError, ValueError):
                size = -1
            with self._lock:
                self.seq += 1
                self.entered.append(Entered(self.seq, name, size, time.time(), threading.current_thread().name))
            return fn(*args, **kwargs)

        return entered

    def _timed_wait(self, wait: Any) -> Any:
        monitor = self

        @functools.wraps(wait)
        def timed(work: Any, *args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not threading.main_thread():
                return wait(work, *args, **kwargs)  # a background checkpoint write: not the step's
            started = time.monotonic()
            last = monitor.entered[-1].op if monitor.entered else "a collective"
            monitor.waiting = (started, last)
            try:
                return wait(work, *args, **kwargs)
            except Exception as exc:
                waited = time.monotonic() - started
                if waited >= 0.9 * monitor.timeout_s:  # the backend's own timeout: the same report
                    path = monitor.report_hang(f"waited {waited:.0f} s in {last}", exit_now=False)
                    raise RuntimeError(f"{exc}; Python stacks and the last collectives in {path}") from exc
                raise
            finally:
                monitor.waiting = None
                monitor.wait_seconds += time.monotonic() - started

        return timed

    def _watch(self) -> None:
        """Every ``poll_s`` a wait of this rank over the timeout ends it; every ``store_poll_s`` (one
        request to the job's store: thousands of ranks ask it) another rank's report does."""
        store = dist.distributed_c10d._get_default_store()
        asked = time.monotonic()
        while not self._stop.wait(self.poll_s):
            waiting = self.waiting
            if waiting is not None and time.monotonic() - waiting[0] > self.timeout_s:
                self.report_hang(f"waited more than parallel.timeout_s={self.timeout_s:g} s in {waiting[1]}")
            if time.monotonic() - asked < self.store_poll_s:
                continue
            asked = time.monotonic()
            try:
                if store.check([_HANG_KEY]):
                    self.report_hang(f"another rank reported a hang: {store.get(_HANG_KEY).decode()}")
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending anyway
                return

    def report_hang(self, reason: str, exit_now: bool = True) -> Path:
        """Write this rank's stacks and last collectives once, tell the other ranks, say where; exit."""
        rank = rank_info.rank()
        path = self.out / HANG_DIR / f"rank_{rank:05d}.txt"
        with self._lock:
            if self.dumped is None:
                self.dumped = path
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("w", encoding="utf-8") as f:
                    f.write(f"rank {rank} (pid {os.getpid()}) at {time.strftime('%Y-%m-%d %H:%M:%S')}: {reason}\n\n"
                            "Python stacks, the most recent call first:\n")
                    f.flush()
                    faulthandler.dump_traceback(f, all_threads=True)
                    f.write(f"\nthe last {len(self.entered)} collectives entered (oldest first):\n")
                    f.writelines(f"  #{e.seq} {e.op} over {e.group_size} ranks at "
                                 f"{time.strftime('%H:%M:%S', time.localtime(e.at))} ({e.thread})\n"
                                 for e in self.entered)
                if not reason.startswith("another rank"):
                    try:
                        dist.distributed_c10d._get_default_store().set(_HANG_KEY, f"rank {rank} {reason}")
                    except Exception:  # noqa: BLE001 - best effort: the others time out by themselves
                        pass
                print(f"rank {rank}: the job hangs ({reason}); Python stacks and the last collectives "
                      f"in {path}", file=sys.stderr, flush=True)
        if exit_now:
            os._exit(1)
        return path


# -- stragglers -------------------------------------------------------------------------------------


class StragglerReport:
    """Each log interval, every rank's mean busy seconds per step, gathered (one float a rank)."""

    def __init__(self, threshold: float, device: torch.device) -> None:
        self.threshold, self.device = threshold, device

    def gather(self, busy: float) -> list[float]:
        """Every rank's value, in rank order (collective; just ``[busy]`` in one process)."""
        if not rank_info.distributed():
            return [busy]
        mine = torch.tensor([busy], dtype=torch.float64, device=self.device)
        parts = [torch.zeros_like(mine) for _ in range(rank_info.world_size())]
        dist.all_gather(parts, mine)
        return [float(p) for p in parts]

    def summary(self, busy: float, step: int) -> tuple[dict[str, Any], str | None]:
        """Log fields (``step_time_min/median/max``, ``slowest_rank``) and a warning naming the
        slowest rank when it is over ``threshold`` x the median of the other ranks (None: no warning;
        the others, not all, so that in a small world the straggler does not raise its own yardstick)."""
        times = self.gather(busy)
        slowest = max(range(len(times)), key=times.__getitem__)
        record = {"step_time_min": min(times), "step_time_median": statistics.median(times),
                  "step_time_max": times[slowest], "slowest_rank": slowest}
        if not self.threshold or len(times) < 2:
            return record, None
        others = statistics.median(times[:slowest] + times[slowest + 1:])
        if times[slowest] <= self.threshold * others:
            return record, None
        return record, (f"step {step}: rank {slowest} is a straggler: busy {times[slowest]:.3f} s a step, "
                        f"{times[slowest] / max(others, 1e-9):.1f}x the other ranks' median {others:.3f} s "
                        f"(train.straggler_threshold={self.threshold:g})")
