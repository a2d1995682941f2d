"""When a job stops before ``train.steps``: Ctrl-C (save, then stop), and the job limits of a cluster
allocation (steps or minutes of this job), decided the same way on every rank by the trainer."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Any

from mtnlg.config import TrainConfig


class StopRequest(contextlib.AbstractContextManager):
    """The first Ctrl-C asks the loop to stop after the current step (and save); a second one aborts."""

    REASON = "interrupted"

    def __init__(self) -> None:
        self.requested = False
        self.previous: Any = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class JobLimits:
    """When this job must end before ``train.steps``: Megatron's --exit-interval (``train.exit_interval``
    steps of this job) and --exit-duration-in-mins (``train.exit_duration_mins`` of wall-clock time)."""

    def __init__(self, tc: TrainConfig, first_step: int, started: float) -> None:
        self.last_step = first_step + tc.exit_interval if tc.exit_interval else None
        self.deadline = started + 60 * tc.exit_duration_mins if tc.exit_duration_mins else None
        self.reasons = [f"train.exit_interval={tc.exit_interval}",
                        f"train.exit_duration_mins={tc.exit_duration_mins:g}"]

    def reached(self, step: int) -> list[bool]:
        """This rank's view, one flag per entry of ``reasons``."""
        return [self.last_step is not None and step >= self.last_step,
                self.deadline is not None and time.monotonic() >= self.deadline]
