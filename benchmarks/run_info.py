"""What every benchmark result records about the run, so that a figure can be judged later.

Figures from a shared machine depend on what else ran: the date, the CPU model and the load
average at the start and end of the run are part of the result, not an afterthought.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_info(load_start: tuple[float, float, float]) -> dict:
    """Date (UTC), machine and load of a benchmark run that began with load average ``load_start``."""
    import torch

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
    }
