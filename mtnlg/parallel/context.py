"""Context parallelism: each of ``cp`` ranks holds ``seq_len / cp`` tokens of every sample, and attention
passes key/value blocks around a ring (Liu et al. 2023, "Ring Attention"; Megatron-Core's
``cp_comm_type=p2p``).

Causal load balancing: the sequence is cut into ``2 cp`` chunks and rank r holds chunks r and
2cp-1-r (a head chunk and its mirrored tail), so every rank has the same number of query-key pairs
under the causal mask (torchtitan's head-tail layout). Positions stay the global ones: the caller
passes ``global_positions`` as the model's ``position_ids`` (learned embeddings and RoPE both read them).

The ring: at step i rank r holds the key/value block of rank r - i; it starts sending that block on
to r + 1 (``batch_isend_irecv``) before computing attention against it, so the transfer overlaps the
block's computation. Each block's partial output and log-sum-exp are merged in fp32 with the online
softmax. The backward runs the ring again: each block's key/value gradient travels with the block
and arrives home after the last step.

``torch.distributed.tensor.experimental.context_parallel`` is not used: in torch 2.13 it dispatches
only the CUDA attention kernels (on CPU: "aten._scaled_dot_product_flash_attention_for_cpu does not
have a sharding strategy registered"), and mtnlg's parallel layouts are tested on CPU with gloo.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mtnlg.config import ConfigError
from mtnlg.model.gpt import CausalSelfAttention


def check_context_parallel(cp: int, seq_len: int, dropout: float) -> None:
    """Every rule of a cp layout, up front, each error naming its fields."""
    if cp < 1:
        raise ConfigError(f"parallel.cp must be >= 1, got {cp}")
    if cp > 1 and seq_len % (2 * cp):
        raise ConfigError(f"model.seq_len={seq_len} must be divisible by 2 * parallel.cp = {2 * cp}: load "
                          "balancing gives each rank two of 2 cp equal chunks")
    if cp > 1 and dropout > 0:
        raise ConfigError(f"model.dropout={dropout} with parallel.cp={cp}: ring attention has no attention "
                          "dropout (set model.dropout=0)")


def global_positions(seq_len: int, cp: int, rank: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The global positions (seq_len / cp,) rank ``rank`` holds: chunks ``rank`` and ``2 cp - 1 - rank``."""
    chunk = seq_len // (2 * cp)
    head, tail = rank * chunk, (2 * cp - 1 - rank) * chunk
    return torch.cat([torch.arange(head, head + chunk), torch.arange(tail, tail + chunk)]).to(device)


def shard_sequence(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's tokens of ``x`` along ``dim`` (the sequence): the same samples, its two chunks."""
    return x.index_select(dim, global_positions(x.shape[dim], cp, rank, x.device))


def _block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q against one key/value block in fp32: output (B, H, T, D) and log-sum-exp (B, H, T)."""
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.clamp_min(torch.finfo(torch.float32).min).unsqueeze(-1))  # a fully masked row: 0
    return p @ v.float(), lse


def _ring_step(group: dist.ProcessGroup, *tensors: torch.Tensor) -> tuple[list[torch.Tensor], list[Any]]:
    """Start sending ``tensors`` to the next rank of the ring and receiving the previous rank's."""
    size, me = dist.get_world_size(group), dist.get_rank(group)
    nxt, prev = dist.get_global_rank(group, (me + 1) % size), dist.get_global_rank(group, (me - 1) % size)
    tensors = tuple(t.contiguous() for t in tensors)
    recv = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, prev, group) for r in recv]
    return recv, dist.batch_isend_irecv(ops)


class RingAttention(torch.autograd.Function):
    """Causal attention of this rank's queries against every rank's keys/values, passed around a ring."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup
                ) -> torch.Tensor:
        cp, me = dist.get_world_size(group), dist.get_rank(group)
        T, scale = q.shape[2], 1.0 / math.sqrt(q.shape[-1])
        q_pos = global_positions(T * cp, cp, me, q.device)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), device=q.device)
        held = (k, v)
        for step in range(cp):
            pending = _ring_step(group, *held) if step < cp - 1 else None
            k_pos = global_positions(T * cp, cp, (me - step) % cp, q.device)
            o_b, lse_b = _block(q, *held, q_pos.unsqueeze(1) >= k_pos.unsqueeze(0), scale)
            new = torch.logaddexp(lse, lse_b)  # online softmax: rescale both partial results to the new sum
            out = out * torch.exp(lse - new).unsqueeze(-1) + o_b * torch.exp(lse_b - new).unsqueeze(-1)
            lse = new
            if pending is not None:
                held, works = pending
                for work in works:
                    work.wait()
        ctx.group, ctx.scale = group, scale
        ctx.save_for_backward(q, k, v, out, lse)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q, k, v, out, lse = ctx.saved_tensors
        group, scale = ctx.group, ctx.scale
        cp, me = dist.get_world_size(group), dist.get_rank(group)
        T = q.shape[2]
        q_pos = global_positions(T * cp, cp, me, q.device)
        g = grad.float()
        delta = (g * out).sum(-1, keepdim=True)  # (B, H, T, 1): rowsum(dO * O)
        dq = torch.zeros_like(g)
        held = (k, v, torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32))
        for step in range(cp):
            kb, vb, dk, dv = held
            k_pos = global_positions(T * cp, cp, (me - step) % cp, q.device)
            mask = q_pos.unsqueeze(1) >= k_pos.unsqueeze(0)
            s = ((q.float() @ kb.float().transpose(-1, -2)) * scale).masked_fill(~mask, float("-inf"))
            p = torch.exp(s - lse.unsqueeze(-1))  # the final softmax probabilities of this block
            dv = dv + p.transpose(-1, -2) @ g
            ds = p * (g @ vb.float().transpose(-1, -2) - delta) * scale
            dq = dq + ds @ kb.float()
            dk = dk + ds.transpose(-1, -2) @ q.float()
            held, works = _ring_step(group, kb, vb, dk, dv)  # the last step brings each gradient home
            for work in works:
                work.wait()
        return dq.to(q.dtype), held[2].to(k.dtype), held[3].to(v.dtype), None


def ring_core(group: dist.ProcessGroup) -> Callable[..., torch.Tensor]:
    """An attention core for ``CausalSelfAttention.core``: SDPA's signature, computed by ``RingAttention``."""

    def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
             **kwargs: Any) -> torch.Tensor:
        if attn_mask is not None:
            raise ConfigError("parallel.cp > 1 supports causal attention only (no padding or document masks)")
        group_size = q.shape[1] // k.shape[1]
        if group_size > 1:  # grouped-query heads: each kv head serves R query heads (gradients sum back)
            k, v = k.repeat_interleave(group_size, dim=1), v.repeat_interleave(group_size, dim=1)
        return RingAttention.apply(q, k, v, group)

    return core


def apply_context_parallel(model: nn.Module, group: dist.ProcessGroup) -> nn.Module:
    """Make every attention layer of ``model`` ring attention over ``group`` (in place; returns it)."""
    core = ring_core(group)
    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            module.core = core
    return model


def check_layout(cfg: Any, dims: Any) -> None:
    """The layouts context parallelism composes with today (a ``Config`` and its ``ParallelDims``)."""
    check_context_parallel(dims.cp, cfg.model.seq_len, cfg.model.dropout)
    if dims.pp > 1 or dims.ep > 1 or cfg.model.moe_experts:
        raise ConfigError("parallel.cp > 1 runs with dp and tp: not yet with parallel.pp > 1, parallel.ep > 1 "
                          "or model.moe_experts (their per-token routing statistics would be per rank)")
    if cfg.parallel.zero in (1, 2):
        raise ConfigError(f"parallel.cp > 1 runs with parallel.zero=3 (FSDP) only, not parallel.zero="
                          f"{cfg.parallel.zero}: the distributed optimizer reduces its gradient buckets over dp alone")


def shard_batch(inputs: torch.Tensor, targets: torch.Tensor, extra: dict, cp: int, rank: int
                ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A micro-batch's inputs and targets (b, T) cut to this rank's chunks, with their global positions."""
    if extra:
        raise ConfigError("parallel.cp > 1 takes pretraining batches only (packed fine-tuning samples carry "
                          "document masks that ring attention does not apply)")
    positions = global_positions(inputs.shape[1], cp, rank, inputs.device).unsqueeze(0)
    return shard_sequence(inputs, cp, rank), shard_sequence(targets, cp, rank), {"position_ids": positions}


@torch.no_grad()
def average_gradients(model: nn.Module, group: dist.ProcessGroup, cp: int) -> None:
    """Average every gradient over the context-parallel ranks (each saw its chunks of the same samples,
    so the mean of their equal-sized mean losses is the whole sequence's). Under FSDP or tp a gradient is
    a DTensor whose local shard is what cp peers hold alike."""
    for p in model.parameters():
        if p.grad is not None:
            local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            dist.all_reduce(local, group=group)
            local.div_(cp)
