"""Install a pinned torch into the running interpreter: the CPU build on a machine without a GPU.

On Linux a plain ``pip install torch`` resolves a CUDA build (several GB of CUDA libraries) even
where there is no GPU; PyTorch publishes its CPU-only wheels on its own index. This script uses
that index when no GPU is visible, and the default index (with pip's own configuration) when the
PyTorch index cannot be reached or has no such wheel, saying so. It uses the standard library
only, since it runs before anything else is installed:

    python tools/install_torch.py 2.13.0            # what `make` runs
    python tools/install_torch.py 2.13.0 --dry-run  # print the pip commands it would try
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def has_gpu() -> bool:
    """An NVIDIA GPU (nvidia-smi lists one, or its device node exists) or an AMD one (ROCm's /dev/kfd)."""
    if Path("/dev/nvidia0").exists() or Path("/dev/kfd").exists():
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def reachable(url: str, timeout: float = 10.0) -> bool:
    """Whether ``url`` answers at all within ``timeout`` seconds (offline machines and blocked hosts fail fast)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status < 400
    except (OSError, urllib.error.URLError, ValueError):
        return False


def pip_commands(version: str, gpu: bool, cpu_index_reachable: bool) -> list[list[str]]:
    """The pip commands to try in order, until one succeeds."""
    default = [sys.executable, "-m", "pip", "install", "-q", f"torch=={version}"]
    if gpu or not cpu_index_reachable:
        return [default]
    return [[*default, "--index-url", CPU_INDEX], default]


def install(commands: list[list[str]], run: Callable[[list[str]], int]) -> int:
    """Run ``commands`` until one succeeds; say when falling back. The last exit status if all fail."""
    status = 1
    for i, command in enumerate(commands):
        status = run(command)
        if status == 0:
            return 0
        if i + 1 < len(commands):
            print(f"install_torch: {' '.join(command[3:])} failed; trying the default index "
                  "(on Linux this may be a CUDA build)", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version", help="torch version to install, e.g. 2.13.0")
    parser.add_argument("--dry-run", action="store_true", help="print the pip commands instead of running them")
    parser.add_argument("--force", action="store_true", help="install even if torch is already importable")
    args = parser.parse_args(argv)
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        if not args.force:
            print("install_torch: torch is already installed; nothing to do")
            return 0
    gpu = has_gpu()
    index_up = not gpu and reachable(f"{CPU_INDEX}/torch/")
    if not gpu:
        print(f"install_torch: no GPU found: the CPU build from {CPU_INDEX}" if index_up else
              f"install_torch: no GPU found, but {CPU_INDEX} cannot be reached: the default index", file=sys.stderr)
    commands = pip_commands(args.version, gpu, index_up)
    if args.dry_run:
        for command in commands:
            print(" ".join(command))
        return 0
    return install(commands, lambda command: subprocess.run(command).returncode)


if __name__ == "__main__":
    raise SystemExit(main())
