"""Scale planner: memory per GPU and step time of a training layout, before paying for a cluster.

``plan(cfg, layout, gpu)`` predicts one layout; ``search(cfg, gpu, gpus, global_batch, ...)`` ranks
the layouts that fit by predicted step time. Everything is arithmetic on the config (nothing is
allocated). The memory model is in ``memory``, the time model in ``timing``, the GPU table and
the efficiency constants in ``hardware``; the pipeline arithmetic is ``mtnlg.config.schedules``'s,
shared with the trainer.

May import: ``mtnlg.util``, ``mtnlg.config``, ``mtnlg.model``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mtnlg.config import ModelConfig
from mtnlg.model.counts import flops_per_token, parameter_count
from mtnlg.planner.hardware import GIB, GPUS, Efficiency, GpuSpec, resolve_gpu
from mtnlg.planner.layout import RUNNABLE_RECOMPUTE, Layout, check_model, make_layout
from mtnlg.planner.memory import Memory, peak_memory
from mtnlg.planner.timing import StepTime, step_time

__all__ = ["GPUS", "Efficiency", "GpuSpec", "Layout", "Plan", "make_layout", "plan", "resolve_gpu", "search"]

SECONDS_PER_DAY = 86400.0


@dataclass
class Plan:
    """The planner's answer for one layout on one cluster."""

    layout: Layout
    gpu: GpuSpec
    parameters: int
    model_flops_per_token: float
    hardware_flops_per_token: float
    memory: Memory
    time: StepTime
    tokens: float
    seq_len: int

    @property
    def fits(self) -> bool:
        """Fits with the headroom the allocator, CUDA context and NCCL buffers need."""
        return self.memory.total <= self.gpu.memory_bytes * (1 - Efficiency().memory_headroom)

    @property
    def tokens_per_step(self) -> int:
        return self.layout.global_batch * self.seq_len

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation: PaLM-convention FLOPs (no recomputation) per second over the peak."""
        flops = self.model_flops_per_token * self.tokens_per_step
        return flops / (self.time.step * self.layout.gpus * self.gpu.peak_flops)

    @property
    def hfu(self) -> float:
        """Hardware FLOPs utilisation: recomputed forwards counted too."""
        return self.mfu * self.hardware_flops_per_token / self.model_flops_per_token

    @property
    def days(self) -> float:
        return self.tokens / self.tokens_per_step * self.time.step / SECONDS_PER_DAY

    def to_dict(self) -> dict[str, object]:
        lay = self.layout
        return {
            "layout": {**lay.to_dict(), "microbatches": lay.microbatches},
            "gpu": dataclasses.asdict(self.gpu),
            "parameters": self.parameters,
            "model_flops_per_token": self.model_flops_per_token,
            "hardware_flops_per_token": self.hardware_flops_per_token,
            "memory_gib": self.memory.gib(),
            "memory_limit_gib": self.gpu.memory_bytes / GIB,
            "fits": self.fits,
            "time_s": self.time.to_dict(),
            "step_time_s": self.time.step,
            "bubble_fraction": self.time.bubble / self.time.step,
            "tokens_per_s": self.tokens_per_step / self.time.step,
            "tflops_per_gpu": self.hfu * self.gpu.peak_flops / 1e12,
            "mfu": self.mfu,
            "hfu": self.hfu,
            "tokens": self.tokens,
            "days": self.days,
        }


def _flops(cfg: ModelConfig, recompute: str) -> tuple[float, float]:
    """(model, hardware) training FLOPs per token: recomputation adds a forward of the layers (full)
    or of the attention scores (selective)."""
    per_token = flops_per_token(cfg)
    model = per_token["train"]
    layers_forward = per_token["forward"] - 2 * cfg.padded_vocab_size * cfg.hidden
    if recompute == "full":
        return model, model + layers_forward
    if recompute == "selective":
        return model, model + 4 * cfg.n_layers * cfg.seq_len * cfg.hidden
    return model, model


def plan(cfg: ModelConfig, layout: Layout, gpu: GpuSpec, *, tokens: float = 0.0,
         efficiency: Efficiency | None = None) -> Plan:
    """Predict one layout. ``tokens`` 0 means 20 tokens per parameter (Hoffmann et al. 2022).

    ``layout.recompute == "auto"`` is not accepted here; see ``plan_auto``.
    """
    check_model(cfg, layout)
    params = parameter_count(cfg)["total"]
    model, hardware = _flops(cfg, layout.recompute)
    return Plan(
        layout=layout, gpu=gpu, parameters=params, model_flops_per_token=model, hardware_flops_per_token=hardware,
        memory=peak_memory(cfg, layout), time=step_time(cfg, layout, gpu, efficiency or Efficiency()),
        tokens=tokens or 20.0 * params, seq_len=cfg.seq_len,
    )


def plan_auto(cfg: ModelConfig, layout: Layout, gpu: GpuSpec, **kwargs: object) -> Plan:
    """``plan`` with the least recomputation ``mtnlg train`` has that fits (none, selective, then full); the
    last one tried if none fits."""
    result = None
    for level in RUNNABLE_RECOMPUTE:
        result = plan(cfg, dataclasses.replace(layout, recompute=level), gpu, **kwargs)  # type: ignore[arg-type]
        if result.fits:
            break
    assert result is not None
    return result
