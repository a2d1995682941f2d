"""When a job stops before ``train.steps`` or saves off its schedule: Ctrl-C and SIGTERM (save, then
stop), SIGUSR1 (save, go on), and the job limits of a cluster allocation (steps or minutes of this
job), decided the same way on every rank by the trainer."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Any

from mtnlg.config import TrainConfig


class StopRequest(contextlib.AbstractContextManager):
    """Signals that end a job or ask for a checkpoint, noted here and acted on between steps.

    The first Ctrl-C (SIGINT) or SIGTERM (the notice Slurm, Kubernetes and torchrun send before
    SIGKILL) asks the loop to stop after the current step and save; a second one of the same
    signal acts as if nothing were installed. SIGUSR1 asks for a checkpoint after the current step
    without stopping. The flags are only read at step boundaries, where the ranks agree on them.
    """

    REASON = "interrupted"
    TERMINATED = "SIGTERM"
    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = False  # SIGINT
        self.terminated = False  # SIGTERM
        self.save_requested = False  # SIGUSR1, cleared by take_save_request
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGUSR1:
            self.save_requested = True
            return
        if signum == signal.SIGTERM:
            self.terminated = True
        else:
            self.requested = True
        signal.signal(signum, self.previous[signum])

    def take_save_request(self) -> bool:
        """Whether SIGUSR1 came since the last call."""
        requested, self.save_requested = self.save_requested, False
        return requested

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)


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
