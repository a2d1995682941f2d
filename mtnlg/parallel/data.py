"""Data parallelism with FSDP2 (``fully_shard``): each data-parallel rank keeps 1/dp of every weight.

ZeRO-3 / FSDP: every block's parameters (and their gradients and AdamW moments) are split by
rows over the ``dp_shard`` ranks. Before a block runs forward (and again in backward when
``parallel.reshard_after_forward``) its weights are all-gathered; after its backward the
gradients are reduce-scattered, averaged over the data-parallel ranks, so each rank holds its
shard of the gradient of the mean loss over the whole global batch, exactly as one process would
compute it. HSDP (``parallel.dp_replicate`` > 1) shards within each of ``dp_replicate`` groups
and all-reduces the shards between them; ``dp_shard = 1`` is plain replication (DDP).

Units of all-gather: each block, then the rest (embeddings, final LayerNorm, output layer) as the
root unit, so the tied embedding / output weight is gathered once; a pipeline rank, whose stages
call those modules directly, shards each of them as a unit of its own. Under tensor parallelism the
parameters are already DTensors over the ``tp`` mesh; FSDP shards them again over ``dp`` (2-D).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from mtnlg.config import Config, ConfigError
from mtnlg.config.schedules import schedule
from mtnlg.model.gpt import GPT
from mtnlg.parallel.dims import ParallelDims
from mtnlg.parallel.expert import shard_experts_over_dp


def fsdp_mixed_precision(cfg: Config, dims: ParallelDims) -> bool:
    """bf16 on GPU under FSDP runs as FSDP mixed precision (bf16 compute copies, fp32 master
    weights and gradient reduction) instead of autocast (``parallel.zero`` 1/2 keep autocast: no FSDP)."""
    return (dims.dp > 1 and cfg.parallel.zero == 3 and dims.device.type == "cuda"
            and cfg.train.precision in ("bf16", "fp8"))


def fsdp_options(cfg: Config, dims: ParallelDims) -> dict[str, Any]:
    """``fully_shard``'s arguments for this run: the dp mesh, resharding, the mixed-precision policy."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if fsdp_mixed_precision(cfg, dims) else MixedPrecisionPolicy()
    return dict(mesh=dims.fsdp_mesh, reshard_after_forward=cfg.parallel.reshard_after_forward, mp_policy=policy)


def apply_data_parallel(model: GPT, dims: ParallelDims, cfg: Config) -> GPT:
    """Shard ``model`` (this rank's part, after tensor parallelism) over the data-parallel mesh in place.

    Under a pipeline the stages call the end modules directly, never the model: each is a unit of
    its own, and each stage is made a root by ``shard_stage`` so that the schedule reduces
    gradients once per step.
    """
    if dims.pp > 1 and schedule(cfg.parallel.pp_schedule).v_shaped:
        raise ConfigError(
            f"parallel.pp_schedule={cfg.parallel.pp_schedule} with parallel.dp > 1 is not supported: its split "
            "backward (input- then weight-gradient passes) does not give FSDP's gradient reduction the right "
            "gradients in torch 2.13; use 1f1b or interleaved_1f1b with data parallelism"
        )
    options = fsdp_options(cfg, dims)
    if dims.ep > 1:  # expert-parallel weights: units of their own over the ranks holding the same experts
        shard_experts_over_dp(model, dims, options["mp_policy"], cfg.parallel.reshard_after_forward)
    for block in model.blocks.values():
        fully_shard(block, **options)
    if dims.pp == 1:
        fully_shard(model, **options)
        return model
    for end in (model.wte, model.wpe, model.ln_f, model.lm_head):
        if end is not None:
            fully_shard(end, **options)
    return model


def shard_stage(stage: nn.Module, cfg: Config, dims: ParallelDims) -> nn.Module:
    """Make a pipeline stage (a view over already-sharded units) an FSDP root: the schedule then turns
    gradient reduction off during its backward passes and reduce-scatters once, after the last one
    (also when zero-bubble schedules split backward into input- and weight-gradient passes)."""
    return fully_shard(stage, **fsdp_options(cfg, dims))


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Reduce gradients in the coming backward (the last micro-batch) or only accumulate them locally."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_requires_gradient_sync(sync, recurse=False)
