"""Run a function on N gloo ranks (CPU processes) and collect what each returns, or fail fast.

Each rank is a fresh process forked from a forkserver that has already imported torch, so a
world starts in well under a second instead of paying torch's import per rank. Ranks run one
compute thread each (the CI machine has 2 cores). A rank that raises fails the whole world with
its traceback; a world still running after ``timeout`` seconds (a collective that never
completes) is killed and fails, so a hang never stalls the suite.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

_PRELOAD = ["torch", "torch.distributed.tensor.parallel", "mtnlg.model.gpt", "mtnlg.parallel.parallelize", "mtnlg.cli"]
_CONTEXT: Any = None


def _context() -> Any:
    """The forkserver context, its server preloading torch once for every world this run starts."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(_PRELOAD)
    return _CONTEXT


def _rank_main(rank: int, world_size: int, store_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    out = Path(store_dir) / f"rank{rank}.pt"
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store_dir}/store",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=60),
        )
        result = fn(*args)
        torch.save({"ok": result}, out)
    except BaseException:
        torch.save({"error": traceback.format_exc()}, out)
        raise SystemExit(1) from None
    if dist.is_initialized():  # `mtnlg train` tears its own down
        dist.destroy_process_group()


def run_world(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
              daemon: bool = True) -> list[Any]:
    """``fn(*args)`` on ``world_size`` gloo ranks; their return values in rank order.

    ``fn`` and its arguments must be picklable (a module-level function). Inside, the default
    process group is initialized; ``torch.distributed.get_rank()`` tells the rank. Ranks that
    start processes of their own (an asynchronous save's writer) must not be daemonic.
    """
    ctx = _context()
    with tempfile.TemporaryDirectory(prefix="mtnlg-world-") as store_dir:
        procs = [
            ctx.Process(target=_rank_main, args=(r, world_size, store_dir, fn, args), daemon=daemon)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        hung = _wait(procs, timeout)
        results = [_load(Path(store_dir) / f"rank{r}.pt") for r in range(world_size)]
    errors = [f"--- rank {r} ---\n{res['error']}" for r, res in enumerate(results) if res and "error" in res]
    if errors:
        raise AssertionError("distributed test failed:\n" + "\n".join(errors))
    if hung:
        raise TimeoutError(f"distributed test still running after {timeout:.0f} s (a hang?); killed")
    missing = [r for r, res in enumerate(results) if res is None]
    if missing:
        raise AssertionError(
            f"ranks {missing} exited with codes {[procs[r].exitcode for r in missing]} and no result"
        )
    return [res["ok"] for res in results]


def _load(path: Path) -> dict[str, Any] | None:
    import torch

    return torch.load(path, weights_only=False) if path.exists() else None


def _wait(procs: list[Any], timeout: float, grace: float = 10.0) -> bool:
    """Join every rank; True if some had to be killed (past ``timeout``, or ``grace`` s after a failure)."""
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in procs):
        if any(p.exitcode not in (None, 0) for p in procs):
            deadline = min(deadline, time.monotonic() + grace)
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
                p.join()
            return True
        time.sleep(0.05)
    return False
