"""What a run reports: a JSONL log (and optionally TensorBoard), MFU, and the loss-curve plot.

``log.jsonl`` has one JSON object per line: ``{"kind": "train", "step", "loss", "lr", "grad_norm",
"tokens_per_s", "mfu", "skipped", ...}`` every ``log_interval`` steps and ``{"kind": "valid",
"step", "loss", "ppl"}`` per validation pass. It is the source of the plot and of any later analysis.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from mtnlg.config import ConfigError
from mtnlg.util.fs import atomic_file

LOG_FILE = "log.jsonl"


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl`` (an unfinished last line, from a crash, is skipped)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLog:
    """Appends records to ``log.jsonl`` and, if asked, TensorBoard scalars under ``tensorboard/``.

    On resume, records of steps after the checkpoint (the work that is being redone) are dropped,
    so the log reads as one uninterrupted run.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = False, resume_step: int | None = None) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOG_FILE
        kept = [r for r in read_log(self.path) if r.get("step", 0) <= resume_step] if (
            resume_step is not None and self.path.is_file()) else []
        self.file = self.path.open("w", encoding="utf-8")
        for record in kept:
            self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.tb = _summary_writer(run_dir / "tensorboard") if tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _summary_writer(directory: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(directory))


LOW_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_matmul(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``device`` has instructions for ``dtype`` matmuls (oneDNN's check on a CPU).

    Without them (e.g. an AVX2-only CPU) PyTorch emulates bf16/fp16 matmuls, an order of magnitude
    slower than fp32 (1.3 against 20 GFLOP/s on a 2-core AVX2 EPYC): autocast then costs speed and
    buys nothing.
    """
    if device.type != "cpu" or dtype == torch.float32:
        return True
    checks = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
              torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}
    return bool(checks[dtype]()) if dtype in checks else True


def precision_warning(device: torch.device, precision: str) -> str | None:
    """A warning naming the faster choice when ``train.precision`` is emulated on ``device``; else None."""
    dtype = LOW_PRECISION_DTYPES.get(precision)
    if dtype is None or native_matmul(device, dtype):
        return None
    return (f"train.precision={precision}: this CPU has no native {precision} matrix instructions, so {precision} "
            "matmuls are emulated, many times slower than fp32: --train.precision=fp32 is faster here "
            "(and more precise)")


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 0) -> float:
    """FLOP/s of a square matmul on ``device``: the peak that MFU is measured against when none is given.

    Uses its own generator, so measuring never shifts the training random streams. An emulated
    dtype gets a smaller matrix: at ~1 GFLOP/s, eight 2048-square products would take minutes.
    """
    size = size or (8192 if device.type == "cuda" else 2048 if native_matmul(device, dtype) else 512)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=gen).to(dtype)
    b = torch.randn(size, size, device=device, generator=gen).to(dtype)
    best = float("inf")
    for _ in range(8):  # the first run warms up; the best of the rest is the peak
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plot_loss_curve(log_path: str | Path, png_path: str | Path) -> Path:
    """Training loss per logged step and validation loss per pass, from ``log.jsonl``, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train" and r.get("loss") is not None]
    valid = [(r["step"], r["loss"]) for r in records if r["kind"] == "valid"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss", linewidth=1.2)
    if valid:
        ax.plot(*zip(*valid, strict=True), "o-", label="validation loss", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_file(png_path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return png_path
