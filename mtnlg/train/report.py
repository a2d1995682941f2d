"""What one ``Trainer.fit`` shows and records: the progress bar, a log record per log interval
(loss, throughput, MFU, the ranks' step times), validation lines; only the main rank writes."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from mtnlg.train.metrics import MetricsLog, measure_matmul_flops
from mtnlg.train.resilience import StragglerReport
from mtnlg.util import dist as rank_info
from mtnlg.util.fmt import format_flops

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


@dataclass
class StepStats:
    """What one optimizer step did (loss averaged over the global batch)."""

    step: int
    loss: float
    grad_norm: float
    lr: float
    batch_size: int
    tokens: int
    seconds: float
    skipped: bool
    busy: float = 0.0  # seconds not spent waiting for other ranks (the straggler report's measure)


class Reporter:
    """Progress bar, log records and printed lines for one ``fit``; only the main rank writes."""

    def __init__(self, trainer: Any, log: MetricsLog | None) -> None:
        """``trainer``: the ``mtnlg.train.trainer.Trainer`` whose steps are reported."""
        self.trainer, self.log = trainer, log
        self.window: list[StepStats] = []
        tc = trainer.tc
        self.bar = tqdm(total=tc.steps, initial=trainer.state.step, unit="step", dynamic_ncols=True,
                        disable=not (trainer.progress and trainer.is_main))
        dtype = AUTOCAST_DTYPES[tc.precision] or torch.float32
        self.peak = tc.peak_flops or measure_matmul_flops(trainer.device, dtype)
        source = "train.peak_flops" if tc.peak_flops else f"measured {tc.precision} matmul; noisy on a busy machine"
        self._print(f"MFU is relative to {format_flops(self.peak)} per device ({source})")
        self.devices = rank_info.world_size()
        self.stragglers = StragglerReport(tc.straggler_threshold, trainer.device)

    def _print(self, text: str) -> None:
        if self.trainer.is_main:
            tqdm.write(text)

    def step(self, stats: StepStats) -> None:
        self.window.append(stats)
        self.bar.update(1)
        if stats.skipped:
            self._print(f"step {stats.step}: loss {stats.loss} / grad norm {stats.grad_norm} is not finite: "
                        f"step skipped ({self.trainer.state.skipped_steps} so far)")

    def flush(self) -> None:
        """One log record summarising the steps since the last one."""
        if not self.window:
            return
        good = [s for s in self.window if not s.skipped]
        last, seconds = self.window[-1], sum(s.seconds for s in self.window)
        tokens_per_s = sum(s.tokens for s in self.window) / seconds
        mfu = tokens_per_s * self.trainer.flops_per_token / (self.peak * self.devices)
        busy = sum(s.busy for s in self.window) / len(self.window)
        ranks, straggler = self.stragglers.summary(busy, last.step)  # collective: every rank flushes
        record = {
            "kind": "train", "step": last.step, "loss": sum(s.loss for s in good) / len(good) if good else None,
            "lr": last.lr, "grad_norm": last.grad_norm, "batch_size": last.batch_size,
            "tokens_per_s": tokens_per_s, "mfu": mfu, "skipped": sum(s.skipped for s in self.window),
            "consumed_tokens": self.trainer.state.consumed_tokens, "peak_flops": self.peak, "time": time.time(),
            **ranks, **self.trainer.experts.log_record(),
        }
        self.window = []
        if self.log is not None:
            self.log.write(record)
        loss = f"{record['loss']:.4f}" if record["loss"] is not None else "skipped"
        self.bar.set_postfix_str(f"loss {loss} lr {last.lr:.2e} {tokens_per_s:,.0f} tok/s mfu {mfu:.0%}")
        if self.bar.disable:
            self._print(f"step {last.step}/{self.trainer.tc.steps}: loss {loss} lr {last.lr:.3e} "
                        f"grad norm {last.grad_norm:.3f} {tokens_per_s:,.0f} tok/s MFU {mfu:.1%}")
        if straggler is not None:
            self._print(f"warning: {straggler}")

    def validation(self, loss: float | None) -> None:
        if loss is None:
            return
        step = self.trainer.state.step
        ppl = math.exp(min(loss, 50.0))
        if self.log is not None:
            self.log.write({"kind": "valid", "step": step, "loss": loss, "ppl": ppl, "time": time.time()})
        self._print(f"step {step}: validation loss {loss:.4f} (perplexity {ppl:,.1f})")

    def close(self) -> None:
        self.bar.close()
        if self.log is not None:
            self.log.close()
