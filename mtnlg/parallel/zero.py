"""ZeRO stages 1 and 2 over data parallelism: Megatron's distributed optimizer, DeepSpeed's ZeRO-1/2.

``parallel.zero=3`` is FSDP2 (``data.py``). With ``zero`` 1 or 2 the weights stay whole on every
data-parallel rank (tensor-parallel shards under tp) and ``ZeroAdamW`` owns the rest:

- each parameter's (tp-local) rows are split into ``dp`` near-equal chunks, FSDP's rule (chunk
  ``ceil(rows / dp)``, the last ranks' possibly shorter); rank ``d`` owns chunk ``d``: the AdamW
  moments exist for its chunk only, as DTensors over the ``dp x tp`` mesh with FSDP's placements,
  so a checkpoint holds the same global tensors under the same names as zero=3's and one
  process's, and DCP reshards it into any layout;
- gradients accumulate locally over the micro-batches; in the backward of the last micro-batch a
  ``post_accumulate_grad`` hook per parameter launches the reduction of each bucket
  (``parallel.bucket_mb``) as soon as all its gradients are final, asynchronously, so it overlaps
  the rest of backward: an all-reduce (zero=1) or a reduce-scatter that leaves each rank only its
  chunk (zero=2). Buckets are launched strictly in order, so every rank issues the same
  collectives. Under a pipeline the schedule runs all backward passes itself; the buckets are
  reduced after it (which is also what lets the zero-bubble V schedules run with dp). Under
  context parallelism each bucket is then all-reduced over the cp ranks as well (they computed
  other tokens of the same samples), and the rows stay split over dp only, so cp peers hold the
  same moments (Megatron splits them over dp x cp);
- ``step`` runs torch's own AdamW kernel (fused where torch has it, as in one process) on the
  owned chunk of every weight, in place, then all-gathers the updated chunks bucket by bucket.

The fp32 weights are the master weights (autocast computes in bf16), so an owned chunk is a view of
the weight, not a copy: optimizer state is 8/dp bytes per parameter, gradients 4 (zero=1) or
4/dp (zero=2), weights 4. torch's ``ZeroRedundancyOptimizer`` is not used: it partitions whole
parameters between ranks (state dicts keyed by rank, not by parameter name and global shape, so
no layout-free resume), does not take DTensor parameters and has no reduce-scatter of gradients.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import Placement, _StridedShard
from torch.optim.adam import adam

from mtnlg.config import Config, ConfigError
from mtnlg.parallel.dims import ParallelDims


def check_zero(cfg: Config, dims: ParallelDims) -> None:
    """ConfigErrors for what zero 1/2 does not combine with (checked on every rank, first)."""
    if cfg.parallel.zero == 3 or dims.dp == 1:
        return
    if dims.ep > 1:
        raise ConfigError("parallel.zero=1/2 with parallel.ep > 1 is not supported: use parallel.zero=3")
    if cfg.train.optimizer == "muon":
        raise ConfigError("parallel.zero=1/2 with train.optimizer=muon is not supported (the distributed optimizer "
                          "is AdamW's): use parallel.zero=3")
    if cfg.parallel.zero == 2 and cfg.train.precision == "fp16":
        raise ConfigError("parallel.zero=2 with train.precision=fp16 is not supported (the loss scaler unscales "
                          "whole gradients): use bf16, or parallel.zero=1")


class _Shard:
    """One parameter's split over the dp ranks: rows ``[start, end)`` of its tp-local tensor are this rank's."""

    def __init__(self, param: nn.Parameter, dp_mesh: DeviceMesh) -> None:
        self.param = param
        local = self.local()
        dp, rank = dp_mesh.size(), dp_mesh.get_local_rank()
        self.rows = local.shape[0] if local.dim() else 1
        self.row_numel = local.numel() // max(self.rows, 1)
        self.chunk = math.ceil(self.rows / dp)
        self.start = min(rank * self.chunk, self.rows)
        self.end = min(self.start + self.chunk, self.rows)
        self.mesh, self.placements = _shard_layout(param, dp_mesh)

    def local(self, tensor: torch.Tensor | None = None) -> torch.Tensor:
        t = self.param if tensor is None else tensor
        return t.to_local() if isinstance(t, DTensor) else t

    @property
    def padded(self) -> int:
        """Elements of one rank's chunk in a bucket's flat buffer (the last ranks' padded)."""
        return self.chunk * self.row_numel

    def owned(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tp-local tensor shaped like the parameter (a view)."""
        t = tensor.reshape(self.rows, *tensor.shape[1:]) if tensor.dim() else tensor.reshape(1)
        return t[self.start:self.end]

    def as_dtensor(self, local_rows: torch.Tensor) -> DTensor:
        """This rank's rows as a piece of the whole parameter-shaped tensor (for DCP and norms)."""
        return DTensor.from_local(local_rows, self.mesh, self.placements, run_check=False,
                                  shape=self.param.shape, stride=self.param.stride())

    def flat_rows(self, tensor: torch.Tensor, dp: int) -> torch.Tensor:
        """A (dp, padded) view-or-copy of a tp-local tensor: chunk d of its rows in row d, zero-padded."""
        flat = tensor.reshape(-1)
        pad = dp * self.padded - flat.numel()
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        return flat.view(dp, self.padded)


def _shard_layout(param: nn.Parameter, dp_mesh: DeviceMesh) -> tuple[DeviceMesh, tuple[Placement, ...]]:
    """FSDP2's mesh and placements for a parameter split by rows over dp (after tp, if a DTensor):
    dim 0 already split by tp is split again over dp as a strided shard."""
    if not isinstance(param, DTensor):
        return dp_mesh, (Shard(0),)
    tp_placements = tuple(param.placements)
    split = math.prod(param.device_mesh.size(i) for i, p in enumerate(tp_placements)
                      if isinstance(p, Shard) and p.dim == 0)
    dp_placement = _StridedShard(0, split_factor=split) if split > 1 else Shard(0)
    return DeviceMesh._concatenate([dp_mesh, param.device_mesh]), (dp_placement, *tp_placements)


class _Bucket:
    """Consecutive parameters (in backward order) whose gradients are reduced by one collective."""

    def __init__(self, shards: list[_Shard]) -> None:
        self.shards = shards
        self.ready: set[int] = set()
        self.work: Any = None
        self.buffer: torch.Tensor | None = None

    @property
    def shard_numel(self) -> int:
        return sum(s.padded for s in self.shards)


class ZeroAdamW(torch.optim.AdamW):
    """AdamW over this rank's chunks of every parameter, with the gradient reduction and the weight
    all-gather of ZeRO stage ``stage`` (1 or 2) over ``dims``' data-parallel ranks.

    Parameter groups, hyper-parameters and state names are ``torch.optim.AdamW``'s, so state dicts
    (``get_state_dict``) name the same entries as a plain AdamW's, each a DTensor of the
    parameter's global shape.
    """

    def __init__(self, groups: list[dict[str, Any]], dims: ParallelDims, stage: int, bucket_mb: float,
                 overlap: bool = True, **adamw: Any) -> None:
        super().__init__(groups, **adamw)
        if dims.dp_mesh is None:
            raise RuntimeError("ZeroAdamW needs the data-parallel mesh (dp > 1 under torch.distributed)")
        self.stage, self.dp_mesh, self.dp = stage, dims.dp_mesh, dims.dp
        self.group = self.dp_mesh.get_group()
        # Context-parallel peers saw other tokens of the same samples: their gradients are summed too (the
        # dp x cp reduction); they own the same rows, so the moments stay split over dp and replicated over cp.
        self.cp_group, self.replicas = (dims.cp_group, self.dp * dims.cp) if dims.cp > 1 else (None, self.dp)
        params = [p for g in self.param_groups for p in g["params"]]
        self.shards = {p: _Shard(p, self.dp_mesh) for p in params}
        self.buckets = _make_buckets([self.shards[p] for p in reversed(params)], bucket_mb * 2**20, self.dp)
        self._bucket_of = {s.param: i for i, b in enumerate(self.buckets) for s in b.shards}
        self._grads: dict[nn.Parameter, torch.Tensor] = {}  # owned rows of the reduced gradients
        self._next = 0  # the next bucket to launch
        self.armed = False  # reduce in the coming backward (its last micro-batch)
        self.overlap = overlap  # False: every bucket waits for the end of backward (to measure the overlap)
        for p in params:
            self._init_state(p)
            p.register_post_accumulate_grad_hook(self._on_gradient)

    def _init_state(self, p: nn.Parameter) -> None:
        """Zero moments for the owned rows (created now, so that a resume loads into them)."""
        shard = self.shards[p]
        rows = shard.owned(shard.local()).detach()
        self.state[p] = {"step": torch.tensor(0.0),
                         "exp_avg": shard.as_dtensor(torch.zeros_like(rows, memory_format=torch.contiguous_format)),
                         "exp_avg_sq": shard.as_dtensor(torch.zeros_like(rows, memory_format=torch.contiguous_format))}

    # -- gradient reduction --------------------------------------------------------------------

    def set_gradient_sync(self, sync: bool) -> None:
        """Reduce in the coming backward (the last micro-batch) or only accumulate locally."""
        self.armed = sync

    def _on_gradient(self, param: torch.Tensor) -> None:
        if not (self.armed and self.overlap):
            return
        bucket = self.buckets[self._bucket_of[param]]  # type: ignore[index]
        bucket.ready.add(id(param))
        while self._next < len(self.buckets) and len(self.buckets[self._next].ready) == len(
                self.buckets[self._next].shards):
            self._launch(self.buckets[self._next])

    def _launch(self, bucket: _Bucket) -> None:
        """Start the bucket's all-reduce (zero=1) or reduce-scatter (zero=2), asynchronously."""
        self._next += 1
        rows = torch.cat([s.flat_rows(self._local_grad(s), self.dp) for s in bucket.shards], dim=1)
        if self.stage == 1:
            bucket.buffer = rows
            bucket.work = dist.all_reduce(rows, group=self.group, async_op=True)
        else:
            bucket.buffer = rows.new_empty(rows.shape[1])
            bucket.work = dist.reduce_scatter_single(bucket.buffer, rows.reshape(-1), group=self.group,
                                                     async_op=True)
            for s in bucket.shards:  # only the owned rows stay
                s.param.grad = None

    def _local_grad(self, shard: _Shard) -> torch.Tensor:
        p = shard.param
        if p.grad is None:  # unused this step: a zero gradient, as one process would see
            return torch.zeros_like(shard.local())
        grad = p.grad
        if isinstance(grad, DTensor) and isinstance(p, DTensor) and grad.placements != p.placements:
            grad = p.grad = grad.redistribute(placements=p.placements)  # e.g. a Partial LayerNorm gradient
        return shard.local(grad)

    def finish_gradient_reduction(self) -> None:
        """Launch the buckets not launched during backward, wait for all; idempotent within a step."""
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
        for bucket in self.buckets:
            if bucket.work is None:
                continue
            bucket.work.wait()
            bucket.work = None
            self._unpack(bucket)

    def _unpack(self, bucket: _Bucket) -> None:
        """The reduced gradients: zero=1 back into ``.grad`` (whole, replicated; this rank's rows are
        views of it, so the fp16 loss scaler unscales what the update reads), zero=2 this rank's rows."""
        assert bucket.buffer is not None
        offset = 0
        if self.cp_group is not None:  # zero=2: only the owned chunk, already summed over dp
            dist.all_reduce(bucket.buffer, group=self.cp_group)
        if self.stage == 1:
            bucket.buffer.div_(self.replicas)
        for s in bucket.shards:
            if self.stage == 1 and s.param.grad is not None:
                grad = s.local(s.param.grad)
                grad.view(-1).copy_(bucket.buffer[:, offset:offset + s.padded].reshape(-1)[:grad.numel()])
                self._grads[s.param] = s.owned(grad)
            else:  # zero=2, or no gradient this step (a zero one, as one process would see)
                mine = bucket.buffer[self.dp_mesh.get_local_rank()] if self.stage == 1 else bucket.buffer
                rows = mine[offset:offset + (s.end - s.start) * s.row_numel]
                if self.stage == 2:
                    rows.div_(self.replicas)
                self._grads[s.param] = rows.view(s.end - s.start, *s.local().shape[1:]) if s.local().dim() else rows
            offset += s.padded
        bucket.buffer = None

    def gradients(self, params: Iterable[nn.Parameter]) -> Iterator[torch.Tensor]:
        """The reduced gradients of ``params``, each as the DTensor of its owned rows (norms, clipping)."""
        self.finish_gradient_reduction()
        return (self.shards[p].as_dtensor(self._grads[p]) for p in params if p in self._grads)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._grads.clear()
        for bucket in self.buckets:
            bucket.ready.clear()
            bucket.buffer = None
        self._next = 0

    # -- the update ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """AdamW on the owned rows of every weight, then the updated rows all-gathered."""
        self.finish_gradient_reduction()
        for group in self.param_groups:
            chunks, grads, avgs, sqs, steps = [], [], [], [], []
            for p in group["params"]:
                grad = self._grads.get(p)
                if grad is None or grad.numel() == 0:
                    continue
                state, shard = self.state[p], self.shards[p]
                chunks.append(shard.owned(shard.local().detach()))
                grads.append(grad)
                avgs.append(state["exp_avg"].to_local())
                sqs.append(state["exp_avg_sq"].to_local())
                steps.append(state["step"])
            if chunks:
                fused = bool(group["fused"]) and all(c.is_contiguous() for c in chunks)
                adam(chunks, grads, avgs, sqs, [], steps, foreach=None if fused else group["foreach"],
                     fused=fused or None, decoupled_weight_decay=True, amsgrad=False, beta1=group["betas"][0],
                     beta2=group["betas"][1], lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                     maximize=False)
        self._gather_weights()

    def _gather_weights(self) -> None:
        """Every rank's updated rows into every rank's weights, one all-gather per bucket."""
        for bucket in self.buckets:
            mine = torch.cat([s.flat_rows(s.local().detach(), self.dp)[self.dp_mesh.get_local_rank()]
                              for s in bucket.shards])
            gathered = mine.new_empty(self.dp * mine.numel())
            dist.all_gather_single(gathered, mine, group=self.group)
            rows, offset = gathered.view(self.dp, -1), 0
            for s in bucket.shards:
                local = s.local().detach()
                local.view(-1).copy_(rows[:, offset:offset + s.padded].reshape(-1)[:local.numel()])
                offset += s.padded

    # -- what the dry run and the tests measure ---------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (the moments of its rows)."""
        return sum(v.to_local().numel() * v.element_size() for s in self.state.values() for k, v in s.items()
                   if k != "step")

    def collectives(self) -> list[tuple[str, int]]:
        """(collective, bytes sent into it per rank) of one step: the reductions, then the all-gathers."""
        op = "all_reduce" if self.stage == 1 else "reduce_scatter"
        reduce = [(op, self.dp * b.shard_numel * 4) for b in self.buckets]
        return reduce + [("all_gather", b.shard_numel * 4) for b in self.buckets]


def _make_buckets(shards: list[_Shard], bucket_bytes: float, dp: int) -> list[_Bucket]:
    """Consecutive shards in buckets of about ``bucket_bytes`` of (whole, tp-local) fp32 gradients."""
    buckets: list[_Bucket] = []
    current: list[_Shard] = []
    size = 0
    for s in shards:
        current.append(s)
        size += s.padded * dp * 4
        if size >= bucket_bytes:
            buckets.append(_Bucket(current))
            current, size = [], 0
    if current:
        buckets.append(_Bucket(current))
    return buckets


def set_gradient_sync(model: nn.Module, optimizer: torch.optim.Optimizer, sync: bool) -> None:
    """Reduce gradients in the coming backward (the last micro-batch) or only accumulate them, under any zero."""
    if isinstance(optimizer, ZeroAdamW):
        optimizer.set_gradient_sync(sync)
        return
    from mtnlg.parallel.data import set_gradient_sync as fsdp_sync

    fsdp_sync(model, sync)


def finish_gradient_reduction(optimizer: torch.optim.Optimizer) -> None:
    """Wait for the distributed optimizer's reductions (a no-op for any other optimizer)."""
    if isinstance(optimizer, ZeroAdamW):
        optimizer.finish_gradient_reduction()


def reduces_context_parallel(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer itself sums the gradients over the context-parallel ranks (the distributed one)."""
    return isinstance(optimizer, ZeroAdamW)


def step_gradients(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> Iterator[torch.Tensor]:
    """The gradients of ``params`` that the step uses: the distributed optimizer's reduced rows, else ``.grad``."""
    if isinstance(optimizer, ZeroAdamW):
        return optimizer.gradients(params)
    return (p.grad for p in params if p.grad is not None)


def sharded_gradients(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor] | None:
    """What clipping scales instead of the parameters' ``.grad``: the distributed optimizer's rows (else None)."""
    if not isinstance(optimizer, ZeroAdamW):
        return None
    return optimizer.gradients(p for g in optimizer.param_groups for p in g["params"])
