"""Pipeline parallelism: the model's layers split into stages, run by ``torch.distributed.pipelining``.

The ``L`` blocks are split into ``S = pp x v`` stages of consecutive layers (``v`` =
``parallel.pp_stages_per_rank``); the first stage also holds the token and position embeddings,
the last the final LayerNorm and output layer. A stage passes its hidden states (B, T, C) to the
next one; gradients flow back the same way. Each pipeline rank runs ``v`` stages:

- loop placement (``1f1b``, ``gpipe``, ``interleaved_1f1b``): rank r runs stages r, r + pp, ...;
- V placement (``zbv``, ``dualpipev``, v = 2): rank r runs stages r and 2 pp - 1 - r, so rank 0
  holds both the first and the last stage.

A global batch is cut into ``m`` micro-batches (``parallel.pp_microbatches``, default the
accumulation steps) that flow through the stages in the schedule's order. The loss of each
micro-batch is divided by ``m`` before backward, so the accumulated gradient is that of the mean
loss, as in the single-process loop (the schedules' own ``scale_grads`` is off: it would divide a
weight shared by two stages of one rank twice).

This process keeps one ``GPT`` holding the union of its stages' parts (``GPT.keep_only``), under
the parameter names of the whole model: optimizer, clipping and checkpoints see one module per
rank as in every other layout. Each ``PipelineStage`` runs a ``GPT.view`` of one stage that
shares those modules.

Tied embeddings (Megatron's approach): when the first and last stage live on different ranks, the
last one holds its own copy of the output weight, initialised equal to the embedding; after
backward the two gradients are summed between the two ranks, so both copies take the same
update. Where one rank holds both (V placement) the weight stays one shared parameter.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleLoopedBFS,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining.schedules import _Action, _ComputationType
from torch.distributed.tensor import DTensor

from mtnlg.config import Config, ConfigError
from mtnlg.config.schedules import SCHEDULES, check_stages_per_rank, layer_split, schedule, stage_ids
from mtnlg.model.gpt import GPT
from mtnlg.model.loss import cross_entropy_loss
from mtnlg.parallel.data import shard_stage
from mtnlg.parallel.dims import ParallelDims
from mtnlg.parallel.expert import set_aux_grad_scale

TORCH_SCHEDULES: dict[str, Any] = {  # every name of mtnlg.config.schedules.SCHEDULES
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "zbv": ScheduleZBVZeroBubble,
    "dualpipev": ScheduleDualPipeV,
}
assert TORCH_SCHEDULES.keys() == SCHEDULES.keys()
def microbatches(cfg: Config, dp: int, global_batch: int) -> int:
    """Pipeline micro-batches of one step with this global batch size."""
    tc = cfg.train
    return cfg.parallel.pp_microbatches or global_batch // (tc.micro_batch_size * dp)


def check_pipeline(cfg: Config, dims: ParallelDims) -> None:
    """Raise a ConfigError naming the fields when the pipeline layout cannot run.

    Every rule a schedule or the transport would otherwise enforce mid-step (a gloo abort, a
    hang, an error on some ranks only) is checked here, identically on every rank, first.
    """
    pc, v, pp = cfg.parallel, cfg.parallel.pp_stages_per_rank, dims.pp
    name = pc.pp_schedule
    check_stages_per_rank(name, v)
    if cfg.train.precision == "fp16":
        raise ConfigError("train.precision=fp16 (dynamic loss scaling) is not supported with parallel.pp > 1: "
                          "use bf16, which needs no loss scaling")
    if cfg.train.compile and schedule(name).v_shaped:
        raise ConfigError(f"parallel.pp_schedule={name} splits backward in two, which torch.compile does not "
                          "support: set train.compile=false or use 1f1b/interleaved_1f1b")
    layer_split(cfg.model.n_layers, pp * v)
    for size in cfg.train.batch_sizes():
        _check_microbatches(cfg, dims, size, "train.global_batch_size (or a ramp-up size)")


def _check_microbatches(cfg: Config, dims: ParallelDims, global_batch: int, what: str) -> None:
    m, local = microbatches(cfg, dims.dp, global_batch), global_batch // dims.dp
    if local % m:
        raise ConfigError(
            f"{what} {global_batch} gives {local} samples per data-parallel rank, which do not split into "
            f"parallel.pp_microbatches={m} equal micro-batches: choose a divisor of {local}"
        )
    _check_schedule_rule(cfg.parallel.pp_schedule, m, dims.pp, "parallel.pp_microbatches")


def _check_schedule_rule(name: str, m: int, pp: int, field: str) -> None:
    if name == "1f1b" and m < pp:
        raise ConfigError(f"1f1b needs at least as many micro-batches as stages: {field}={m} < parallel.pp={pp} "
                          f"(raise the global batch or set parallel.pp_microbatches >= {pp})")
    rounds = max(1, m // pp)
    if name == "interleaved_1f1b" and m % rounds:
        good = [k for k in range(pp, 2 * pp * pp + 1) if k % max(1, k // pp) == 0][:4]
        raise ConfigError(f"interleaved_1f1b runs micro-batches in rounds of parallel.pp={pp}: {field}={m} is not "
                          f"a multiple of its {rounds} rounds (valid counts include {good})")
    if name == "dualpipev" and m < 2 * pp:
        raise ConfigError(f"dualpipev needs at least 2 x parallel.pp = {2 * pp} micro-batches, got {field}={m}")


def keep_rank_stages(model: GPT, dims: ParallelDims, cfg: Config) -> GPT:
    """Delete, in place, every part of ``model`` that none of this rank's stages holds."""
    num_stages = dims.pp * cfg.parallel.pp_stages_per_rank
    split = layer_split(cfg.model.n_layers, num_stages)
    mine = stage_ids(dims.pp_rank, dims.pp, cfg.parallel.pp_stages_per_rank, cfg.parallel.pp_schedule)
    layers = [layer for s in mine for layer in split[s]]
    return model.keep_only(layers, embeddings=0 in mine, head=num_stages - 1 in mine)


# -- running it -----------------------------------------------------------------------------------


def _microbatch_loss(logits: torch.Tensor, targets: torch.Tensor, m: int) -> torch.Tensor:
    """One micro-batch's share of the batch's mean loss (a plain tensor, also from vocab-parallel logits)."""
    loss = cross_entropy_loss(logits, targets)
    if isinstance(loss, DTensor):
        loss = loss.to_local()
    return loss / m


class Pipeline:
    """Steps and validation passes of this rank's stages through the configured schedule.

    ``model`` is this rank's part (``keep_rank_stages``). Schedules are built per micro-batch
    count (a batch-size ramp-up changes it) and reused.
    """

    def __init__(self, model: GPT, dims: ParallelDims, cfg: Config) -> None:
        check_pipeline(cfg, dims)
        self.model, self.dims, self.cfg = model, dims, cfg
        pc = cfg.parallel
        self.num_stages = dims.pp * pc.pp_stages_per_rank
        split = layer_split(cfg.model.n_layers, self.num_stages)
        self.stage_ids = stage_ids(dims.pp_rank, dims.pp, pc.pp_stages_per_rank, pc.pp_schedule)
        self.views = [
            model.view(split[s], embeddings=s == 0, head=s == self.num_stages - 1) for s in self.stage_ids
        ]
        if dims.dp > 1 and cfg.parallel.zero == 3:  # zero 1/2 reduce after the schedule (zero.py)
            self.views = [shard_stage(view, cfg, dims) for view in self.views]
        self.has_first, self.has_last = 0 in self.stage_ids, self.num_stages - 1 in self.stage_ids
        self._schedules: dict[tuple[int, bool], Any] = {}
        tied_copy = cfg.model.tie_embeddings and not schedule(pc.pp_schedule).v_shaped
        self._tied = _TiedEmbeddingGrads(model, dims) if tied_copy else None

    def _schedule(self, m: int, training: bool) -> Any:
        """The schedule for ``m`` micro-batches.

        Validation is forward-only and runs the micro-batches breadth-first (GPipe; LoopedBFS's
        order over the rank's stages), which has no micro-batch rule: ``train.eval_iters`` is free.
        """
        name = self.cfg.parallel.pp_schedule
        single = SCHEDULES[name].max_stages == 1
        if not training:
            name = "gpipe" if single else "forward_v" if SCHEDULES[name].v_shaped else "looped_bfs"
        key = (m, training)
        if key not in self._schedules:
            stages = [
                PipelineStage(view, s, self.num_stages, self.dims.device, group=self.dims.pp_group)
                for view, s in zip(self.views, self.stage_ids, strict=True)
            ]
            cls = {"looped_bfs": ScheduleLoopedBFS, "forward_v": _ForwardOnlyV, **TORCH_SCHEDULES}[name]
            self._schedules[key] = cls(stages[0] if single else stages, n_microbatches=m,
                                       loss_fn=partial(_microbatch_loss, m=m), scale_grads=False)
        return self._schedules[key]

    def _run(self, inputs: torch.Tensor, targets: torch.Tensor, m: int, training: bool, forward: dict | None = None
             ) -> torch.Tensor:
        """Run the schedule; the (m,) losses of the micro-batches. ``forward``: further forward arguments of
        every stage, split into micro-batches like the inputs (context parallelism's global positions)."""
        for view in self.views:  # views share the modules, not the module's own mode flag
            view.train(self.model.training)
        schedule = self._schedule(m, training)
        set_aux_grad_scale(self.model, 1.0 / m)  # a stage's MoE losses join the loss with the micro-batch weight
        losses: list[torch.Tensor] | None = [] if self.has_last else None
        args = (inputs,) if self.has_first else ()
        target = targets if self.has_last else None
        run = schedule.step if training else schedule.eval
        run(*args, target=target, losses=losses, return_outputs=False, **(forward or {}))
        loss = torch.stack(losses).detach().float() * m if losses else torch.zeros(m, device=inputs.device)
        dist.all_reduce(loss, group=self.dims.pp_group)  # the last stage's losses, on every pipeline rank
        return loss

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, m: int, forward: dict | None = None) -> torch.Tensor:
        """Forward and backward of this rank's batch in ``m`` micro-batches; the mean loss, on every pp rank.

        Gradients accumulate in ``.grad`` as in the single-process loop.
        """
        loss = self._run(inputs, targets, m, True, forward).mean()
        if self._tied is not None:
            self._tied.sum_grads()
        return loss

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor, m: int, forward: dict | None = None
                 ) -> torch.Tensor:
        """The loss of each of ``m`` micro-batches (a forward-only pass), on every pp rank."""
        return self._run(inputs, targets, m, False, forward)

    def counted_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters to count in the global gradient norm: a tied copy of the embedding counts once."""
        copy = self.model.lm_head.weight if self._tied is not None and self.has_last else None
        return (p for p in self.model.parameters() if p is not copy)

    def reduce_norm(self, local_norm: torch.Tensor) -> torch.Tensor:
        """The global L2 norm from each pipeline rank's norm of its own parameters."""
        squared = local_norm.double() ** 2
        dist.all_reduce(squared, group=self.dims.pp_group)
        return squared.sqrt().to(local_norm.dtype)


class _ForwardOnlyV(ScheduleLoopedBFS):
    """Forward-only passes over V-placed stages: each rank runs its first stage on every micro-batch,
    then its second.

    torch 2.13's V schedules cannot run ``eval()`` (the runtime still performs their backward
    actions), and LoopedBFS assumes loop placement. This is LoopedBFS's order with the V stage
    map; the backward actions it must hold to pass the order's validation are then dropped.
    """

    _FORWARD_ONLY = (_ComputationType.FORWARD, _ComputationType.SEND_F, _ComputationType.RECV_F)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pipeline_order_with_comms = {
            rank: [a for a in actions if a.computation_type in self._FORWARD_ONLY]
            for rank, actions in self.pipeline_order_with_comms.items()
        }

    def _calculate_single_rank_operations(self, rank: int) -> list[_Action | None]:
        pp = self.pp_group_size
        placement = {s: r for r in range(pp) for s in stage_ids(r, pp, 2, "zbv")}
        self.stage_index_to_group_rank = placement  # read by the communication planning that follows
        for stage in self._stages:
            stage.stage_index_to_group_rank = placement
        mine, mbs = stage_ids(rank, pp, 2, "zbv"), range(self._n_microbatches)
        forward = [_Action(s, _ComputationType.FORWARD, mb) for s in mine for mb in mbs]
        backward = [_Action(s, _ComputationType.FULL_BACKWARD, mb) for s in reversed(mine) for mb in reversed(mbs)]
        return forward + backward


class _TiedEmbeddingGrads:
    """Sums the gradients of the embedding (first stage) and its output-layer copy (last stage).

    One two-rank group per (data-parallel, tensor-parallel) position, made by every rank in the
    same order as ``new_group`` requires; each rank keeps the group it belongs to, if any. Under
    tensor parallelism both weights are split by vocabulary rows the same way, so the local
    shards are summed.
    """

    def __init__(self, model: GPT, dims: ParallelDims) -> None:
        ranks = dims.mesh.mesh  # type: ignore[union-attr]  # (pp, dp, tp) global ranks
        self.group: Any = None
        for pair in zip(ranks[0].flatten().tolist(), ranks[-1].flatten().tolist(), strict=True):
            group = dist.new_group(list(pair))
            if dims.rank in pair:
                self.group = group
        holder = model.wte if model.wte is not None else model.lm_head
        self.weight = holder.weight if holder is not None and self.group is not None else None

    def sum_grads(self) -> None:
        if self.weight is None:
            return
        grad = self.weight.grad
        if grad is None:  # the peer is already inside the all-reduce: fail rather than hang it
            raise RuntimeError("the tied embedding has no gradient after the pipeline's backward")
        if isinstance(grad, DTensor):
            # The embedding's backward leaves its gradient replicated; the output layer's is split
            # by vocabulary like both weights. Sum the same rows on both sides.
            if grad.placements != self.weight.placements:
                grad = self.weight.grad = grad.redistribute(placements=self.weight.placements)
            grad = grad.to_local()
        dist.all_reduce(grad, group=self.group)
