"""Expert parallelism: each MoE layer's E experts split over the ``ep`` ranks, tokens exchanged by all-to-all.

GShard / DeepSpeed-MoE / torchtitan. Rank r of the ``ep`` mesh (P ranks) holds experts
[r E/P, (r+1) E/P): every stacked expert weight becomes a ``Shard(0)`` DTensor. Routing stays local
(each rank routes its own tokens with the whole, replicated router); only the expert computation
crosses ranks, wrapped around the ``GroupedExperts`` module:

1. dispatch: the rank's assignments arrive sorted by expert with ``counts`` (E,); the counts are
   exchanged first (``all_to_all_single``, P x E/P numbers), so each rank learns how many rows it
   will receive from each peer for each of its experts; then the rows themselves, in uneven
   splits (autograd ``all_to_all_single``: backward sends the gradients the opposite way);
2. the received rows, grouped by source rank then expert, are reordered to be grouped by expert
   and run through the local experts' grouped matmuls;
3. combine: the outputs are put back in arrival order and returned by the reverse all-to-all.

The result is exactly what one process computes, for dropless and capacity routing alike (the
capacity is applied by the source rank to its own tokens, as one process applies it to a
micro-batch). ``ep`` borrows its ranks from data parallelism (``ParallelDims``): expert weights
are sharded further by FSDP over the data-parallel ranks that hold the same experts, their
gradients divided by the whole data-parallel size, since each rank's experts saw tokens of all
``ep`` peers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard, distribute_module, distribute_tensor

from mtnlg.config import Config, ConfigError
from mtnlg.model.moe import GroupedExperts, moe_layers, take_statistics, update_expert_bias
from mtnlg.parallel.dims import ParallelDims


def check_expert_parallel(cfg: Config, dims: ParallelDims) -> None:
    """Raise a ConfigError naming the fields when the MoE layers cannot run in this layout."""
    experts = cfg.model.moe_experts
    if experts and dims.tp > 1:
        raise ConfigError("MoE layers (model.moe_experts > 0) have no tensor-parallel plan: use parallel.ep and "
                          "parallel.dp instead of parallel.tp")
    if dims.ep > 1 and (not experts or experts % dims.ep):
        raise ConfigError(f"parallel.ep={dims.ep} must divide model.moe_experts={experts}: each expert-parallel "
                          "rank holds an equal share of every MoE layer's experts")


def _shard_experts(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    for pname, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(pname, nn.Parameter(distribute_tensor(param, mesh, [Shard(0)])))


def _dispatch(module: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor], mesh: DeviceMesh) -> tuple[Any, ...]:
    """(rows sorted by expert, counts (E,)) of this rank -> (rows for the local experts, their counts)."""
    rows, counts = inputs
    group, P = mesh.get_group(), mesh.size()
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)  # received[p * E_l + e]: rows from p for local e
    local = counts.numel() // P
    send_splits = counts.view(P, local).sum(1).tolist()
    recv_splits = received.view(P, local).sum(1).tolist()
    arrived = funcol.all_to_all_single_autograd(rows, recv_splits, send_splits, group)
    expert_of_row = torch.arange(local, device=counts.device).repeat(P).repeat_interleave(received)
    order = expert_of_row.argsort(stable=True)  # arrival order (source, expert) -> expert order
    module._ep_route = (order, send_splits, recv_splits)
    return arrived[order], received.view(P, local).sum(0)


def _combine(module: nn.Module, out: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Local experts' outputs back to arrival order, then home to the ranks the rows came from."""
    order, send_splits, recv_splits = module._ep_route
    del module._ep_route
    back = out[order.argsort()]
    return funcol.all_to_all_single_autograd(back, send_splits, recv_splits, mesh.get_group())


def apply_expert_parallel(model: nn.Module, dims: ParallelDims) -> nn.Module:
    """Split every MoE layer's experts over the ``ep`` mesh in place (Shard(0) DTensors + all-to-all)."""
    for _, moe in moe_layers(model):
        distribute_module(moe.experts, dims.ep_mesh, _shard_experts, _dispatch, _combine)
    return model


def shard_experts_over_dp(model: nn.Module, dims: ParallelDims, policy: MixedPrecisionPolicy,
                          reshard_after_forward: bool) -> None:
    """FSDP units of their own for the expert-parallel weights, over the data-parallel ranks that hold the same
    experts; run before the blocks are sharded, so the blocks' units leave them out."""
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            fully_shard(module, mesh=dims.expert_fsdp_mesh, reshard_after_forward=reshard_after_forward,
                        mp_policy=policy)
            module.set_gradient_divide_factor(float(dims.dp))  # the mean over every data-parallel rank's loss
            # Sum, then divide: gloo has no pre-scaled sum. (On one rank FSDP divides without a collective,
            # and forcing the sum would divide a second time.)
            module.set_force_sum_reduction_for_comms(dims.expert_fsdp_mesh.size() > 1)


def set_aux_grad_scale(model: nn.Module, scale: float | None) -> None:
    """Pipeline stages: each MoE layer attaches its auxiliary loss with this backward weight (see mtnlg.model.moe)."""
    for _, moe in moe_layers(model):
        moe.aux_grad_scale = scale


class ExpertStatistics:
    """Before each optimizer step: sum the step's per-expert token counts over the data-parallel (and context-
    parallel) ranks, update the auxiliary-loss-free biases from them, and keep them for the log (``log_record``).

    Registered as an optimizer step pre-hook, so the training loop has no MoE case; a dense model has no
    statistics and the hook does nothing.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, dims: ParallelDims) -> None:
        self.model, self.group = model, dims.dp_group
        self.cp_group = dims.cp_group if dims.cp > 1 else None  # cp ranks routed other tokens of the same samples
        self.window: dict[str, torch.Tensor] = {}
        if any(True for _ in moe_layers(model)):
            optimizer.register_step_pre_hook(lambda *_: self.step())

    def step(self) -> None:
        stats = take_statistics(self.model)
        if not stats:
            return
        stacked = torch.stack(list(stats.values()))  # (layers, E + 4)
        for group in (self.group, self.cp_group):
            if group is not None:
                dist.all_reduce(stacked, group=group)
        summed = dict(zip(stats, stacked, strict=True))
        update_expert_bias(self.model, {name: row[:-4] for name, row in summed.items()})
        for name, row in summed.items():
            self.window[name] = self.window[name] + row if name in self.window else row

    def log_record(self) -> dict[str, Any]:
        """Since the last record: ``moe_balance_loss`` (unweighted Switch loss, 1 = balanced), ``moe_dropped``
        (fraction of assignments dropped by capacity) and ``moe_load`` (layer -> each expert's share of the
        assignments, 1/E each when balanced); empty for a dense model."""
        if not self.window:
            return {}
        rows = torch.stack(list(self.window.values()))
        assignments, dropped, balance, forwards = rows[:, -4:].sum(0).tolist()
        load = {name.removesuffix(".mlp"): [round(v, 4) for v in (row[:-4] / row[:-4].sum()).tolist()]
                for name, row in self.window.items()}
        self.window = {}
        return {"moe_balance_loss": balance / forwards, "moe_dropped": dropped / assignments, "moe_load": load}
