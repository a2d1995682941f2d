"""What every layout's training step needs around the model: the gradient norm and clipping over
parameters that live on several meshes, and the loss under a vocabulary-parallel output layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from mtnlg.parallel.dims import ParallelDims


def _by_mesh(tensors: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Tensors grouped by the mesh they are distributed over (plain tensors together): DTensor ops take one mesh."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(getattr(t, "device_mesh", None), []).append(t)
    return list(groups.values())


def grad_norm(grads: Iterable[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all ``grads``, whole (sharded parts reduced), when they live on several meshes: expert
    weights on the ep x dp_shard_mod_ep mesh, the rest on dp_shard."""
    norms = []
    for group in _by_mesh(grads):
        norm = torch.nn.utils.get_total_norm(group)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def clip_grads(params: Iterable[nn.Parameter], max_norm: float, total_norm: torch.Tensor,
               grads: Iterable[torch.Tensor] | None = None) -> None:
    """``clip_grads_with_norm_`` for parameters on several meshes, one mesh at a time; ``grads``: clip
    these gradients instead of the parameters' (the distributed optimizer's shards)."""
    if grads is not None:
        for group in _by_mesh(grads):
            torch._foreach_mul_([g.to_local() if isinstance(g, DTensor) else g for g in group],
                                _clip_coefficient(max_norm, total_norm))
        return
    for group in _by_mesh(p for p in params if p.grad is not None):
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total_norm)


def _clip_coefficient(max_norm: float, total_norm: torch.Tensor) -> torch.Tensor:
    """``clip_grads_with_norm_``'s factor, so that shards are scaled exactly as whole gradients."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


def loss_context(dims: ParallelDims) -> contextlib.AbstractContextManager:
    """Wrap forward and backward of a training step in this: under tp the loss is vocab-parallel.

    The tensor-parallel output layer leaves the logits split by vocabulary; ``loss_parallel``
    lets ``F.cross_entropy`` (in the model) and its backward work on the shards.
    """
    return loss_parallel() if dims.tp_enabled else contextlib.nullcontext()
