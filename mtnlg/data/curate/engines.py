"""The engines a curation stage runs on, all datatrove executors with the same completion markers:
``local`` (processes on this machine: the default, nothing to start), ``ray`` (a Ray cluster, its
address from ``--ray-address`` or ``RAY_ADDRESS``) and ``slurm`` (one job array per stage, each
depending on the one before)."""

from __future__ import annotations

import contextlib
import os
import sys

from datatrove.executor import LocalPipelineExecutor
from datatrove.executor.slurm import SlurmPipelineExecutor
from datatrove.utils.logging import logger


def quiet_logs() -> None:
    """No datatrove log lines on the terminal: each task's full log, a failed task's traceback
    included, is in ``logs/STAGE/logs/task_RANK.log``, and the error itself reaches the command."""
    logger.remove()
    logger.add(sys.stderr, level="CRITICAL")


class QuietLocalExecutor(LocalPipelineExecutor):
    """datatrove's local executor with each task's log in its file only (errors still reach the
    terminal): the terminal shows one progress bar per stage instead of every task's log lines."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):  # noqa: ANN201
        # the task's logger (datatrove adds it per task) writes errors to stderr: a task's traceback
        # goes to its log file only, and the error itself to the command, which prints one line
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            try:
                return super()._run_for_rank(rank, local_rank=1, node_rank=node_rank)
            finally:
                quiet_logs()  # datatrove restores its chatty default logger after each task


class SlurmExecutor(SlurmPipelineExecutor):
    """datatrove's Slurm executor, leaving the partition to the cluster's default when none is named
    (datatrove writes a bare ``#SBATCH --partition``, which sbatch rejects)."""

    def get_sbatch_args(self, max_array: int = 1) -> dict:
        args = super().get_sbatch_args(max_array)
        if not self.partition:
            del args["partition"]
        return args


def make_executor(cfg, steps: list, tasks: int, logging_dir: str, previous=None):  # noqa: ANN001, ANN201
    """The executor of one stage on ``cfg.engine``; ``previous`` is the stage it waits for (Slurm)."""
    workers = min(cfg.workers, tasks)
    options = dict(cfg.engine_options)
    quiet_logs()
    if cfg.engine == "local":
        return QuietLocalExecutor(steps, tasks=tasks, workers=workers, logging_dir=logging_dir, start_method="fork")
    if cfg.engine == "ray":
        import ray
        from datatrove.executor.ray import RayPipelineExecutor

        if not ray.is_initialized():
            ray.init(address=options.pop("address", None) or None, log_to_driver=False)
        return RayPipelineExecutor(steps, tasks=tasks, workers=workers, logging_dir=logging_dir)
    return SlurmExecutor(steps, tasks=tasks, workers=workers, logging_dir=logging_dir, depends=previous,
                                 time=options.pop("time", "4:00:00"), partition=options.pop("partition", None),
                                 job_name=f"mtnlg-{logging_dir.rsplit('/', 1)[-1]}", **options)

