"""The optimisation recipe of MT-NLG: AdamW parameter groups, warmup + cosine LR, batch-size ramp-up.

Schedules are pure functions of training progress (optimizer steps, or consumed tokens and
samples), so resuming a run needs nothing but those counters to continue exactly where it stopped.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mtnlg.config import ConfigError, ParallelConfig, TrainConfig
from mtnlg.parallel.dims import ParallelDims
from mtnlg.parallel.zero import ZeroAdamW
from mtnlg.train.muon import build_muon


def parameter_groups(
    model: nn.Module, weight_decay: float, decay_position_embedding: bool = True
) -> list[dict[str, object]]:
    """Two AdamW groups: matrices decay; biases (a MoE layer's stacked ones too) and LayerNorm do not.

    Decaying a LayerNorm gain pulls it towards 0 instead of its natural value 1, and biases are too
    few to overfit with, hence Megatron's split. Position embeddings may optionally join the
    no-decay group. Tied parameters appear once (``named_parameters`` de-duplicates them).
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_position = name.endswith("wpe.weight")
        if param.dim() < 2 or name.endswith("bias") or (is_position and not decay_position_embedding):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _fused_supported(params: list[torch.Tensor]) -> bool:
    """torch's fused AdamW kernel runs on CPU and CUDA for floating-point tensors of one device type."""
    devices = {p.device.type for p in params}
    return len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)


def build_optimizer(model: nn.Module, cfg: TrainConfig, dims: ParallelDims | None = None,
                    parallel: ParallelConfig | None = None) -> torch.optim.Optimizer:
    """AdamW over ``parameter_groups``, using torch's fused kernel where it exists, else foreach;
    under ``parallel.zero`` 1 or 2 with dp > 1, the distributed optimizer (``mtnlg.parallel.zero``).

    The fused kernel updates every parameter in one pass over memory (param, grad, two moments),
    which matters on CPUs where the step is memory-bound. ``train.optimizer=muon``: ``MuonAdamW``
    (``mtnlg.train.muon``), Muon for the blocks' matrices and this AdamW for the rest.
    """
    groups = parameter_groups(model, cfg.weight_decay, cfg.weight_decay_position_embedding)
    params = [p for g in groups for p in g["params"]]  # type: ignore[attr-defined]
    fused = _fused_supported(params)
    options = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None,
                   foreach=None if fused else True)
    if dims is not None and parallel is not None and dims.dp > 1 and parallel.zero < 3:
        return ZeroAdamW(groups, dims, parallel.zero, parallel.bucket_mb, **options)
    if cfg.optimizer == "muon":
        adamw = {k: v for k, v in options.items() if k != "lr"}
        return build_muon(model, groups, cfg.lr, cfg.muon_momentum, adamw)
    return torch.optim.AdamW(groups, **options)


def learning_rate(cfg: TrainConfig, step: int, consumed_tokens: int) -> float:
    """Linear warmup to ``cfg.lr``, then cosine decay to ``cfg.lr * cfg.min_lr_ratio``, then constant;
    or, with ``lr_schedule=wsd`` (warmup-stable-decay), ``cfg.lr`` until the last ``decay_fraction``
    of the run, then a linear decay to the minimum.

    Progress is counted in optimizer steps (``warmup_steps``, decay until ``decay_steps`` or
    ``steps``), or in tokens when ``cfg.decay_tokens > 0`` (``warmup_tokens``, ``decay_tokens``) as
    MT-NLG did, which keeps the schedule independent of the batch-size ramp-up.
    ``step`` is the number of optimizer steps already taken (0 for the first step)::

        warmup:  lr * (p + 1) / warmup            for p < warmup
        decay:   min + (lr - min) * (1 + cos(pi * r)) / 2,  r = (p - warmup) / (end - warmup)
    """
    if cfg.decay_tokens > 0:
        progress, warmup, end = consumed_tokens, cfg.warmup_tokens, cfg.decay_tokens
    else:
        progress, warmup, end = step, cfg.warmup_steps, cfg.decay_steps or cfg.steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    if progress < warmup:
        return cfg.lr * (progress + 1) / warmup
    if progress >= end or end <= warmup:
        return min_lr
    ratio = (progress - warmup) / (end - warmup)
    if cfg.lr_schedule == "wsd":
        start = 1.0 - cfg.decay_fraction  # the stable phase ends here (a fraction of warmup .. end)
        return cfg.lr if ratio < start else cfg.lr + (min_lr - cfg.lr) * (ratio - start) / cfg.decay_fraction
    return min_lr + (cfg.lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * ratio))


def global_batch_size(cfg: TrainConfig, consumed_samples: int) -> int:
    """The global batch of the next step under Megatron's ramp-up ``[start, increment, ramp_samples]``.

    The batch grows from ``start`` by ``increment`` each time another
    ``ramp_samples / ((global - start) / increment)`` samples have been consumed, reaching
    ``global_batch_size`` after ``ramp_samples`` samples. Without a ramp-up it is constant.
    """
    if not cfg.rampup_batch_size:
        return cfg.global_batch_size
    start, increment, ramp_samples = cfg.rampup_batch_size
    increments = (cfg.global_batch_size - start) // increment
    if increments <= 0 or consumed_samples >= ramp_samples:
        return cfg.global_batch_size
    samples_per_increment = ramp_samples / increments
    return min(cfg.global_batch_size, start + int(consumed_samples // samples_per_increment) * increment)


def validate_batch_sizes(cfg: TrainConfig, dp: int = 1) -> None:
    """Every global batch the run will use must split into whole micro-batches on every dp rank."""
    unit = cfg.micro_batch_size * dp
    bad = [s for s in cfg.batch_sizes() if s % unit]
    if bad:
        raise ConfigError(
            f"train.global_batch_size (or a ramp-up size) {bad[0]} is not a multiple of "
            f"micro_batch_size x data-parallel size = {cfg.micro_batch_size} x {dp} = {unit}"
        )
