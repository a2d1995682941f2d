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
and arrives home after the last step. Packed documents (fine-tuning's ``document_ids``): each block's
ids travel with it and mask keys of other documents; ``shard_batch`` weighs each rank's loss by its
share of the counted targets. ZeRO-1/2 reduce over cp in ``zero.py``; MoE layers sum their expert
counts over cp (``MoE.sequence_counts``) and fill a capacity in the whole micro-batch's priority order
(``MoE.sequence_kept``); expert parallelism needs nothing more (its all-to-all moves each rank's own tokens,
and the experts' gradients are averaged over cp like every other); a pipeline gets the positions as a
forward argument.

``torch.distributed.tensor.experimental.context_parallel`` is not used: in torch 2.13 it dispatches
only the CUDA attention kernels (on CPU: "aten._scaled_dot_product_flash_attention_for_cpu does not
have a sharding strategy registered"), and mtnlg's parallel layouts are tested on CPU with gloo.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mtnlg.config import ConfigError
from mtnlg.model.gpt import CausalSelfAttention, document_positions
from mtnlg.model.loss import IGNORE_INDEX
from mtnlg.model.moe import MoE


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


def _mask(q_pos: torch.Tensor, k_pos: torch.Tensor, q_docs: torch.Tensor | None, k_docs: torch.Tensor | None
          ) -> torch.Tensor:
    """Which keys of a block each query sees: causal by global position (T, T), and with packed documents
    (their ids, (B, T) each) within its own document only (B, 1, T, T)."""
    causal = q_pos.unsqueeze(1) >= k_pos.unsqueeze(0)
    if q_docs is None or k_docs is None:
        return causal
    return (causal & (q_docs.unsqueeze(2) == k_docs.unsqueeze(1))).unsqueeze(1)


def _ring_step(group: dist.ProcessGroup, *tensors: torch.Tensor) -> tuple[list[torch.Tensor], list[Any]]:
    """Start sending ``tensors`` to the next rank of the ring and receiving the previous rank's."""
    size, me = dist.get_world_size(group), dist.get_rank(group)
    nxt, prev = dist.get_global_rank(group, (me + 1) % size), dist.get_global_rank(group, (me - 1) % size)
    tensors = tuple(t.contiguous() for t in tensors)
    recv = [torch.empty_like(t) for t in tensors]
    if tensors[0].is_meta:  # a dry run's forward (shapes only): nothing to send, and no backend for meta
        return recv, []
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, prev, group) for r in recv]
    return recv, dist.batch_isend_irecv(ops)


class RingAttention(torch.autograd.Function):
    """Causal attention of this rank's queries against every rank's keys/values, passed around a ring; with
    ``docs`` (this rank's document ids, (B, T)) the ids travel with their block and mask other documents."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
                docs: torch.Tensor | None = None) -> torch.Tensor:
        cp, me = dist.get_world_size(group), dist.get_rank(group)
        T, scale = q.shape[2], 1.0 / math.sqrt(q.shape[-1])
        q_pos = global_positions(T * cp, cp, me, q.device)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), device=q.device)
        held = (k, v) if docs is None else (k, v, docs)
        for step in range(cp):  # step 0 is the rank's own block, where every query sees itself: lse is finite
            pending = _ring_step(group, *held) if step < cp - 1 else None
            k_pos = global_positions(T * cp, cp, (me - step) % cp, q.device)
            mask = _mask(q_pos, k_pos, docs, held[2] if docs is not None else None)
            o_b, lse_b = _block(q, held[0], held[1], mask, scale)
            new = torch.logaddexp(lse, lse_b)  # online softmax: rescale both partial results to the new sum
            out = out * torch.exp(lse - new).unsqueeze(-1) + o_b * torch.exp(lse_b - new).unsqueeze(-1)
            lse = new
            if pending is not None:
                held, works = pending
                for work in works:
                    work.wait()
        ctx.group, ctx.scale = group, scale
        ctx.save_for_backward(q, k, v, out, lse, docs)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse, docs = ctx.saved_tensors
        group, scale = ctx.group, ctx.scale
        cp, me = dist.get_world_size(group), dist.get_rank(group)
        T = q.shape[2]
        q_pos = global_positions(T * cp, cp, me, q.device)
        g = grad.float()
        delta = (g * out).sum(-1, keepdim=True)  # (B, H, T, 1): rowsum(dO * O)
        dq = torch.zeros_like(g)
        held = (k, v, torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32))
        held += (docs,) if docs is not None else ()
        for step in range(cp):
            kb, vb, dk, dv = held[:4]
            k_pos = global_positions(T * cp, cp, (me - step) % cp, q.device)
            mask = _mask(q_pos, k_pos, docs, held[4] if docs is not None else None)
            s = ((q.float() @ kb.float().transpose(-1, -2)) * scale).masked_fill(~mask, float("-inf"))
            p = torch.exp(s - lse.unsqueeze(-1))  # the final softmax probabilities of this block
            dv = dv + p.transpose(-1, -2) @ g
            ds = p * (g @ vb.float().transpose(-1, -2) - delta) * scale
            dq = dq + ds @ kb.float()
            dk = dk + ds.transpose(-1, -2) @ q.float()
            held, works = _ring_step(group, kb, vb, dk, dv, *held[4:])  # the last step brings each gradient home
            for work in works:
                work.wait()
        return dq.to(q.dtype), held[2].to(k.dtype), held[3].to(v.dtype), None, None


def ring_transfers(tokens: int, heads: int, head_dim: int, cp: int, act_bytes: int, recomputed: bool
                   ) -> tuple[int, int]:
    """(ring steps, bytes this rank sends) of one attention layer's forward and backward over ``tokens`` local
    tokens (micro-batch x seq_len / cp) of ``heads`` query heads (the blocks are expanded to them): forward
    cp - 1 steps of k and v at ``act_bytes`` an element (twice when the core is ``recomputed``), backward cp
    steps of k, v and their fp32 gradients. Document ids (packed samples, 8 bytes a token) are left out."""
    block, forwards = tokens * heads * head_dim, 2 if recomputed else 1
    steps = forwards * (cp - 1) + cp
    return steps, block * (forwards * (cp - 1) * 2 * act_bytes + cp * 2 * (act_bytes + 4))


def ring_core(group: dist.ProcessGroup) -> Callable[..., torch.Tensor]:
    """An attention core for ``CausalSelfAttention.core``: SDPA's signature, computed by ``RingAttention``.
    Its ``attn_mask`` is None (causal) or the rank's document ids (``GPT.document_mask`` passes them on)."""

    def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
             **kwargs: Any) -> torch.Tensor:
        if attn_mask is not None and (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
            raise ConfigError("parallel.cp > 1 supports causal attention and packed documents only (no padding masks)")
        group_size = q.shape[1] // k.shape[1]
        if group_size > 1:  # grouped-query heads: each kv head serves R query heads (gradients sum back)
            k, v = k.repeat_interleave(group_size, dim=1), v.repeat_interleave(group_size, dim=1)
        return RingAttention.apply(q, k, v, group, attn_mask)

    return core


def _document_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """``GPT.document_mask`` under cp: the ids themselves, which ring attention compares block by block."""
    return document_ids


def _summed(counts: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``MoE.sequence_counts`` under cp: a forward's per-expert counts summed over the cp ranks."""
    counts = counts.clone()
    dist.all_reduce(counts, group=group)
    return counts


def _kept(experts: torch.Tensor, n_experts: int, capacity: Callable[[int], int], group: dist.ProcessGroup
          ) -> torch.Tensor:
    """``MoE.sequence_kept`` under cp: how many of this rank's assignments each expert keeps when the whole
    micro-batch's capacity is filled in one process's priority order (slot-major, then sample and global
    position). ``experts`` (B, T, k) are this rank's choices; every rank's are gathered (B T k ids each)."""
    B, T, k = experts.shape
    cp, me, E = dist.get_world_size(group), dist.get_rank(group), n_experts
    gathered = [torch.empty_like(experts) for _ in range(cp)]
    dist.all_gather(gathered, experts.contiguous(), group=group)
    whole = torch.stack(gathered)  # (cp, B, T, k)
    token = torch.stack([global_positions(T * cp, cp, r, experts.device) for r in range(cp)])  # (cp, T)
    token = token.view(cp, 1, T, 1) + torch.arange(B, device=experts.device).view(1, B, 1, 1) * (T * cp)
    slot = torch.arange(k, device=experts.device).view(1, 1, 1, k)
    priority = (whole * k + slot) * (B * T * cp) + token  # by expert, then slot, then the token's global index
    order = priority.flatten().argsort()
    flat = whole.flatten()[order]
    counts = torch.bincount(flat, minlength=E)
    rank_in_expert = torch.arange(flat.numel(), device=flat.device) - (counts.cumsum(0) - counts)[flat]
    keep = torch.empty_like(rank_in_expert, dtype=torch.bool)
    keep[order] = rank_in_expert < capacity(B * T * cp)
    mine = keep.view(cp, -1)[me]
    return torch.bincount(experts.flatten()[mine], minlength=E)


def apply_context_parallel(model: nn.Module, group: dist.ProcessGroup) -> nn.Module:
    """Make every attention layer of ``model`` ring attention over ``group`` (in place; returns it), and every
    MoE layer's balance loss and capacity those of the whole sequences."""
    core = ring_core(group)
    model.document_mask = _document_ids  # type: ignore[assignment]
    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            module.core = core
        if isinstance(module, MoE):
            module.sequence_counts = partial(_summed, group=group)
            module.sequence_kept = partial(_kept, group=group)
    return model


def shard_batch(inputs: torch.Tensor, targets: torch.Tensor, extra: dict, cp: int, rank: int
                ) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor]:
    """A micro-batch's inputs and targets (b, T) cut to this rank's chunks, the forward arguments (global
    positions; with packed documents their ids, and positions restarting at each document of the whole
    row), and the factor that turns this rank's mean loss into its share of the micro-batch's.

    That factor is cp x (this rank's counted targets) / (all counted targets): 1 for pretraining, where
    every rank counts the same tokens; fine-tuning's ignored prompt tokens (-100) need not fall evenly.
    A rank with no counted target scores one token with weight 0 (a mean over nothing is NaN)."""
    unknown = set(extra) - {"document_ids"}
    if unknown:
        raise ConfigError(f"parallel.cp > 1: the batch carries {sorted(unknown)}, which ring attention does not apply")
    index = global_positions(inputs.shape[1], cp, rank, inputs.device)
    documents = extra.get("document_ids")
    if documents is None:
        forward: dict = {"position_ids": index.unsqueeze(0)}
    else:
        forward = {"position_ids": document_positions(documents).index_select(1, index),
                   "document_ids": documents.index_select(1, index)}
    mine = targets.index_select(1, index)
    counted, total = (mine != IGNORE_INDEX).sum(), (targets != IGNORE_INDEX).sum()
    first = torch.zeros_like(mine, dtype=torch.bool)
    first[0, 0] = True
    mine = torch.where(first & (counted == 0), 0, mine)
    return inputs.index_select(1, index), mine, forward, (counted * cp).float() / total.float()


def shard_pipeline_batch(batch: torch.Tensor, cp: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A pipeline's batch (b, T + 1) cut to this rank's chunks, with the global positions (b, T / cp) that every
    stage reads (split into micro-batches with the inputs)."""
    if batch.dim() != 2:
        raise ConfigError("parallel.cp > 1 with parallel.pp > 1 takes pretraining batches only: the ranks' shares of "
                          "fine-tuning's counted tokens cannot reach the schedule's loss")
    index = global_positions(batch.shape[1] - 1, cp, rank, batch.device)
    positions = index.expand(batch.shape[0], -1).contiguous()
    return batch[:, :-1].index_select(1, index), batch[:, 1:].index_select(1, index), {"position_ids": positions}


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
