"""``parallelize(model, dims, cfg)``: turn the plain single-device GPT into this rank's part of it.

Transformations apply in a fixed order, each taking the previous one's module:

1. pipeline parallelism: keep only the parts of this rank's stages (``pipeline.py``); it comes
   first because it decides which parameters exist on this rank at all;
2. tensor (+ sequence) parallelism: shard every remaining layer over the ``tp`` mesh (``tensor.py``);
3. materialise: a model built on the meta device (``mtnlg.train.build.build_model``) has only
   its tensor-parallel shards allocated on the rank's device, each filled with its slice of the
   single-process initial value (made from ``train.seed`` and the weight's name, one block at a
   time), so every layout starts from the single-process weights and no rank ever holds more
   than its shards and one block; then expert parallelism splits each MoE layer's experts over
   the ``ep`` mesh (``expert.py``; tp and ep are not combined);
4. activation recomputation: the model's own ``model.recompute`` (none, selective, full);
5. compile (``train.compile``): each block in place, so parameter names stay those of the plain model;
6. data parallelism (FSDP2, ``data.py``), outermost, so it shards the already tensor-parallel
   parameters again over the data-parallel ranks; under ``parallel.zero`` 1 or 2 the weights stay
   whole and the optimizer shards its state instead (``zero.py``, built by the trainer).

The pipeline schedule itself is run by the trainer (``pipeline.Pipeline``) over this rank's part.
The single-process model is the reference every layout is tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from mtnlg.config import Config, ConfigError
from mtnlg.model.gpt import GPT
from mtnlg.parallel.context import apply_context_parallel, check_context_parallel
from mtnlg.parallel.data import apply_data_parallel
from mtnlg.parallel.dims import ParallelDims
from mtnlg.parallel.expert import apply_expert_parallel, check_expert_parallel
from mtnlg.parallel.fp8 import apply_fp8, check_fp8
from mtnlg.parallel.pipeline import check_pipeline, keep_rank_stages
from mtnlg.parallel.tensor import apply_tensor_parallel
from mtnlg.parallel.zero import check_zero


def parallelize(
    model: GPT, dims: ParallelDims, cfg: Config, *, inference: bool = False, fill: Callable[[GPT], None] | None = None
) -> GPT:
    """Apply the parallel layout of ``dims`` to ``model`` in place and return it.

    ``model`` is either built on the meta device (it is then materialised and initialised from
    ``train.seed``) or already holds weights, which every rank must share (same seed, or the same
    checkpoint). ``inference=True`` is for generation: no sequence parallelism (a decode step has
    one token) and the logits are gathered, since sampling needs the whole vocabulary. ``fill``,
    for a meta model, allocates and fills this rank's part instead of initialising it from the
    seed (a checkpoint read shard by shard: ``mtnlg.checkpoint.shards``).
    """
    if dims.dp > 1 and inference:
        raise ConfigError("generation runs on tensor-parallel ranks only: every process must be a --tp rank")
    if dims.pp > 1:
        if inference:
            raise ConfigError("generation runs on tensor-parallel ranks only: use --tp, not a pipeline")
        check_pipeline(cfg, dims)
        keep_rank_stages(model, dims, cfg)
    check_expert_parallel(cfg, dims)
    if dims.device.type != "meta":  # a dry run plans the layout; the hardware is the real run's
        check_fp8(cfg, dims.device)
    if dims.cp > 1:
        if inference:
            raise ConfigError("generation runs in one process or on tensor-parallel ranks: not with parallel.cp")
        check_context_parallel(dims.cp, cfg.model.seq_len, cfg.model.dropout)
        apply_context_parallel(model, dims.cp_group)
    if dims.tp_enabled:
        apply_tensor_parallel(
            model,
            dims.tp_mesh,
            sequence_parallel=cfg.parallel.sequence_parallel and not inference,
            loss_parallel=not inference,
        )
    if any(p.is_meta for p in model.parameters()) and dims.device.type != "meta":  # meta: a dry run
        fill(model) if fill is not None else materialize(model, dims.device, cfg.train.seed)
    if dims.ep > 1:
        apply_expert_parallel(model, dims)
    if cfg.train.precision == "fp8" and not inference and dims.device.type != "meta":
        apply_fp8(model, cfg, dims)
    if cfg.train.compile and not inference:
        for block in model.blocks.values():
            block.compile()
    if dims.dp > 1 and cfg.parallel.zero == 3:  # zero 1/2: weights stay whole; the optimizer shards (zero.py)
        check_zero(cfg, dims)
        apply_data_parallel(model, dims, cfg)
    elif dims.dp > 1:
        check_zero(cfg, dims)
    return model


@torch.no_grad()
def materialize(model: GPT, device: torch.device, seed: int) -> None:
    """Allocate ``model`` (this rank's part, built on meta, maybe tensor-parallel) on ``device`` and
    give every parameter and buffer (e.g. a router's expert biases), or its shard, the
    single-process initial value.

    The values come from a plain model of one block (then of the embeddings and output end)
    initialised on the CPU by ``GPT.reset_parameters``, whose per-weight streams make them
    independent of what else is built; each rank copies the slice its shard holds.
    """
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gave each holder of the shared weight its own tensor
    mine = dict(model.named_parameters()) | dict(model.named_buffers())
    parts = [([int(i)], False, False) for i in model.blocks] + [([], model.wte is not None, model.lm_head is not None)]
    for layers, embeddings, head in parts:
        with torch.device("meta"):
            reference = GPT(model.cfg).keep_only(layers, embeddings=embeddings, head=head).materialize("cpu", seed)
        for name, value in [*reference.named_parameters(), *reference.named_buffers()]:
            param = mine[name]
            if isinstance(param, DTensor):
                value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None).to_local()
                param = param.to_local()
            param.copy_(value)
