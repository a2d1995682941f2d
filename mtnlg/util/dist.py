"""The one place that asks torch.distributed where this process stands.

Code that runs both in one process and under ``torchrun`` asks here instead of calling
``dist.get_rank()`` directly (which raises when no process group exists).
"""

from __future__ import annotations

import torch.distributed as dist


def distributed() -> bool:
    """Whether a default process group exists (a ``torchrun`` job, or a test's gloo world)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank; 0 in one process."""
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    """Processes in the job; 1 in one process."""
    return dist.get_world_size() if distributed() else 1


def is_main() -> bool:
    """Whether this process prints, logs and writes the files one writer writes: global rank 0."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing in one process)."""
    if distributed():
        dist.barrier()
