"""The one place that asks torch.distributed where this process stands.

Code that runs both in one process and under ``torchrun`` asks here instead of calling
``dist.get_rank()`` directly (which raises when no process group exists). Before the process
group is made (and after it is torn down) a ``torchrun`` worker still knows its rank from the
``RANK`` variable torchrun sets, so the answer is the same at every moment of a job.
"""

from __future__ import annotations

import os

import torch.distributed as dist


def distributed() -> bool:
    """Whether a default process group exists (a ``torchrun`` job, or a test's gloo world)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank: the process group's, else torchrun's ``RANK``; 0 in one process."""
    return dist.get_rank() if distributed() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Processes in the job: the process group's, else torchrun's ``WORLD_SIZE``; 1 in one process."""
    return dist.get_world_size() if distributed() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Whether this process prints, logs and writes the files one writer writes: global rank 0."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing in one process)."""
    if distributed():
        dist.barrier()
