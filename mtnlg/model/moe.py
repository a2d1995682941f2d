"""Sparse mixture-of-experts MLP: a router sends each token to its top-k of E expert MLPs.

Parameters grow with E while the FLOPs per token stay those of k experts (Shazeer et al. 2017;
GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021; DeepSpeed-MoE, Rajbhandari et al. 2022).
Plain single-device PyTorch; ``mtnlg.parallel.expert`` splits the experts over ranks from outside.
Shapes: N tokens (B x T flattened), C hidden, F expert inner width, E experts, k experts per token.

Router (fp32 whatever the autocast dtype: the top-k choice is sensitive to rounding)
    logits = x W_r (N, E); scores s = softmax(logits) or sigmoid(logits) (DeepSeek-V3);
    the top-k experts of ``s + b`` are chosen, where b is the auxiliary-loss-free bias
    (zero unless ``model.moe_balance`` includes bias); the gates are the chosen scores s,
    renormalised to sum to 1 when k > 1 or scores are sigmoids (top-1 softmax keeps s, as in
    Switch, so that the router still gets a gradient from the language-model loss).
Dispatch
    The N k assignments are ordered slot-major (every token's first choice before any second
    choice, GShard's priority) and stably sorted by expert. Dropless (``moe_capacity_factor`` 0)
    runs them all; otherwise expert e keeps its first ``ceil(cf N k / E)`` and the rest are
    dropped: their share of the output is zero and the residual connection carries the token.
Experts
    Stacked weights (E, F, C) and (E, C, F), GELU in between. On the CPU the kept assignments are
    gathered into an (E, W, C) block padded to the busiest expert's W rows and run as two batched
    matmuls (``bmm``; one thread barrier each instead of one per expert, see ``MoE._padded``), the
    gathers' backwards gathers too (no scatter-add); elsewhere as two grouped matmuls over the sorted
    tokens (``torch._grouped_mm``; a loop over experts where it does not apply):
    y_i = sum_{e in topk(i)} g_ie (W2_e gelu(W1_e x_i + b1_e) + b2_e); SwiGLU experts
    (``model.mlp`` swiglu) add a gate matrix: W2_e (silu(Wg_e x_i) * W1_e x_i), biases per ``model.bias``.
Load balancing
    aux: the Switch/GShard loss  E sum_e f_e P_e  (f_e the fraction of assignments to e,
    P_e the mean router probability of e), whose minimum 1 is reached by a uniform router;
    bias: b_e += rate * sign(mean load - load_e) before each optimizer step (``update_expert_bias``,
    from the token counts of the step); z-loss: mean(logsumexp(logits)^2) keeps logits small.

The weighted auxiliary losses reach the training gradient through ``GPT.forward``, which adds the
ones its MoE layers computed (``take_aux_loss``) to the loss's gradient, not to its value: the
loss reported stays the language-model loss, comparable with a dense model's. A pipeline stage
cannot add a loss computed on another stage, so there each layer attaches its loss to its output
instead (``aux_grad_scale``): the output is unchanged and backward gives the auxiliary loss the
micro-batch's gradient weight. The training log reports the balance loss separately.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtnlg.config import ModelConfig


def _local(p: torch.Tensor) -> torch.Tensor:
    """The tensor this process computes with: the local shard of an expert-parallel (DTensor) weight."""
    return p.to_local() if hasattr(p, "to_local") else p


def _grouped_mm_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm runs fp32 on CPU and bf16 on CUDA, with rows aligned to 16 bytes."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    kind = (x.device.type, x.dtype)
    aligned = all(n * x.element_size() % 16 == 0 for n in w.shape[1:])
    return aligned and kind in {("cpu", torch.float32), ("cuda", torch.bfloat16)}


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, counts: torch.Tensor
) -> torch.Tensor:
    """Rows of ``x`` (M, in), sorted by expert with ``counts[e]`` rows for expert e, through expert e's
    Linear: weight (E, out, in), bias (E, out) or None; returns (M, out)."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    x, weight = x.to(dtype), weight.to(dtype)
    if _grouped_mm_applies(x, weight):
        y = torch._grouped_mm(x, weight.transpose(1, 2), offs=counts.cumsum(0).to(torch.int32))
    else:
        y = torch.cat([chunk @ weight[e].T for e, chunk in enumerate(x.split(counts.tolist()))])
    if bias is None:
        return y
    return y + bias.to(dtype).repeat_interleave(counts, dim=0, output_size=x.shape[0])


class GroupedExperts(nn.Module):
    """E expert MLPs as stacked weights: Linear(C -> F), GELU, Linear(F -> C) (or SwiGLU's gate, up and down),
    each stored as nn.Linear's (out, in) rows, so expert e's weights are a dense MLP's (upcycling copies them)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, C, Fe = cfg.moe_experts, cfg.hidden, cfg.expert_ffn_size
        self.fc_in_weight = nn.Parameter(torch.empty(E, Fe, C))
        self.fc_gate_weight = nn.Parameter(torch.empty(E, Fe, C)) if cfg.mlp == "swiglu" else None
        self.fc_out_weight = nn.Parameter(torch.empty(E, C, Fe))
        self.fc_in_bias = nn.Parameter(torch.empty(E, Fe)) if cfg.bias else None
        self.fc_gate_bias = nn.Parameter(torch.empty(E, Fe)) if cfg.bias and cfg.mlp == "swiglu" else None
        self.fc_out_bias = nn.Parameter(torch.empty(E, C)) if cfg.bias else None
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"

    def reset_parameters(self, generator: Callable[[str], torch.Generator], std: float, out_std: float) -> None:
        """Each stacked weight drawn like the dense MLP's (N(0, std), the output one N(0, out_std)), from its own
        stream named after it; biases zero."""
        with torch.no_grad():
            self.fc_in_weight.normal_(0.0, std, generator=generator("fc_in_weight"))
            self.fc_out_weight.normal_(0.0, out_std, generator=generator("fc_out_weight"))
            if self.fc_gate_weight is not None:
                self.fc_gate_weight.normal_(0.0, std, generator=generator("fc_gate_weight"))
            for bias in (self.fc_in_bias, self.fc_gate_bias, self.fc_out_bias):
                if bias is not None:
                    bias.zero_()

    def _linear(self, x: torch.Tensor, part: str, counts: torch.Tensor) -> torch.Tensor:
        weight, bias = _local(getattr(self, f"{part}_weight")), getattr(self, f"{part}_bias")
        return grouped_linear(x, weight, None if bias is None else _local(bias), counts)

    def _bmm(self, x: torch.Tensor, part: str) -> torch.Tensor:
        """Padded rows (E, W, in) through every expert's Linear at once: one batched matmul (bias added by it)."""
        weight, bias = getattr(self, f"{part}_weight"), getattr(self, f"{part}_bias")
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x, weight = x.to(dtype), weight.to(dtype).transpose(1, 2)
        if bias is None:
            return torch.bmm(x, weight)
        return torch.baddbmm(bias.to(dtype).unsqueeze(1), x, weight)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Tokens (M, C) sorted by expert, ``counts`` (E,) of them per expert held here -> (M, C); or tokens padded
        to (E, W, C), expert e's ``counts[e]`` first in its row block -> (E, W, C) (rows past them are don't-care)."""
        if x.dim() == 3:
            linear: Callable[[torch.Tensor, str], torch.Tensor] = self._bmm
        else:
            linear = lambda h, part: self._linear(h, part, counts)  # noqa: E731
        if self.fc_gate_weight is not None:  # SwiGLU: silu(gate x) * up x
            h = F.silu(linear(x, "fc_gate")) * linear(x, "fc_in")  # (M, F)
        else:
            h = F.gelu(linear(x, "fc_in"), approximate=self.approximate)  # (M, F)
        return linear(h, "fc_out")  # (M, C)


def _pick(x: torch.Tensor, idx: torch.Tensor, zero_row: bool) -> torch.Tensor:
    """Rows ``idx`` of ``x`` (R, C); with ``zero_row`` the index R picks a row of zeros."""
    if zero_row:
        x = torch.cat([x, x.new_zeros(1, x.shape[1])])
    return x.index_select(0, idx)


class _Gather(torch.autograd.Function):
    """Rows of ``x`` picked by ``idx``; backward picks the gradient's rows by ``back`` (the inverse map, its
    out-of-range entries zero rows) and sums each run of ``fold`` consecutive ones. Both directions are gathers:
    autograd's backward of an index is a scatter-add, serial on the CPU and, under load, the layer's costliest
    memory pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, idx: torch.Tensor, back: torch.Tensor, fold: int,
                zero_rows: tuple[bool, bool]) -> torch.Tensor:
        ctx.save_for_backward(back)
        ctx.fold, ctx.zero_row = fold, zero_rows[1]
        return _pick(x, idx, zero_row=zero_rows[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        (back,) = ctx.saved_tensors
        picked = _pick(grad.contiguous(), back, zero_row=ctx.zero_row)
        if ctx.fold > 1:
            picked = picked.view(-1, ctx.fold, grad.shape[1]).sum(1)
        return picked, None, None, None, None


class Router(nn.Module):
    """Scores every expert for every token in fp32 and picks each token's top k with their gates."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.score = cfg.moe_top_k, cfg.moe_score
        self.gate = nn.Linear(cfg.hidden, cfg.moe_experts, bias=False)
        self.use_bias = "bias" in cfg.moe_balance
        self.register_buffer("expert_bias", torch.zeros(cfg.moe_experts), persistent=self.use_bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens (N, C) -> gates (N, k), expert ids (N, k), scores (N, E) and logits (N, E), all fp32."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.gate.weight.float())  # (N, E)
        scores = logits.softmax(dim=-1) if self.score == "softmax" else logits.sigmoid()
        choice = scores + self.expert_bias if self.use_bias else scores  # the bias only picks, it never weighs
        experts = choice.topk(self.top_k, dim=-1).indices  # (N, k)
        gates = scores.gather(-1, experts)
        if self.top_k > 1 or self.score == "sigmoid":
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return gates, experts, scores, logits


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on the layer output; backward gives the auxiliary loss the gradient ``scale`` (Megatron-Core's
    MoEAuxLossAutoScaler), as if it had been added to the loss with that weight."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        return grad, torch.full((), ctx.scale, device=grad.device), None


class MoE(nn.Module):
    """A MoE MLP: router, grouped experts, optional always-on shared expert; (B, T, C) -> (B, T, C)."""

    def __init__(self, cfg: ModelConfig, shared_expert: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg)
        self.shared = shared_expert
        self.dropout = nn.Dropout(cfg.dropout)
        self.aux_grad_scale: float | None = None  # set by a pipeline schedule: attach the loss, do not record it
        self._aux_loss: torch.Tensor | None = None
        # Context parallelism (mtnlg.parallel.context): sums a forward's per-expert counts over the ranks holding
        # the rest of the same sequences, so the balance loss's assignment fractions are the whole sequences'.
        self.sequence_counts: Callable[[torch.Tensor], torch.Tensor] | None = None
        # ... and, with a capacity, how many of this rank's assignments each expert keeps: the whole micro-batch's
        # capacity, filled in the whole sequences' priority order: (experts (B, T, k), E, capacity) -> (E,).
        self.sequence_kept: Callable[[torch.Tensor, int, Callable[[int], int]], torch.Tensor] | None = None
        E = cfg.moe_experts
        # Statistics of the training forwards since the last optimizer step (not saved: they restart each step).
        self.register_buffer("tokens_per_expert", torch.zeros(E), persistent=False)
        self.register_buffer("stats", torch.zeros(4), persistent=False)  # assignments, dropped, aux sum, forwards

    def reset_parameters(self, generator: Callable[[str], torch.Generator], std: float, out_std: float) -> None:
        self.experts.reset_parameters(lambda key: generator(f"experts.{key}"), std, out_std)
        self.router.expert_bias.zero_()
        self.tokens_per_expert.zero_()
        self.stats.zero_()

    def capacity(self, n_tokens: int) -> int:
        """Assignments one expert takes from ``n_tokens`` tokens; 0 means no limit (dropless)."""
        cf = self.cfg.moe_capacity_factor
        return math.ceil(cf * n_tokens * self.cfg.moe_top_k / self.cfg.moe_experts) if cf else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        if x.is_meta:  # shape inference (a pipeline stage): routing needs real values
            return torch.empty_like(x)
        tokens = x.reshape(B * T, C)  # (N, C)
        N, E, k = B * T, self.cfg.moe_experts, self.cfg.moe_top_k
        gates, experts, scores, logits = self.router(tokens)
        flat = experts.t().reshape(-1)  # (k N) slot-major: all first choices, then all second ones
        order = flat.argsort(stable=True)  # assignments grouped by expert, in priority order
        counts = torch.bincount(flat, minlength=E)  # (E,) assignments per expert
        position = torch.arange(N * k, device=x.device) - (counts.cumsum(0) - counts)[flat[order]]  # rank in expert
        kept = self._kept(experts.view(B, T, k), counts)
        if self._padded():
            out = self._padded_experts(tokens, gates, flat, order, kept, position)
        else:
            out = self._sorted_experts(tokens, gates, flat, order, kept, position)
        out = out.view(B, T, C)
        out = self.dropout(out)
        if self.shared is not None:
            out = out + self.shared(x)
        if self.training:
            out = self._aux(out, counts, scores, logits, dropped=N * k - int(kept.sum()))
        return out

    def _kept(self, experts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """(E,) assignments each expert keeps, its first ones in priority order: all of them when dropless, else
        at most the capacity (under cp: this rank's part of the whole micro-batch's, ``sequence_kept``)."""
        if not self.cfg.moe_capacity_factor:
            return counts
        if self.sequence_kept is not None:
            return self.sequence_kept(experts, counts.numel(), self.capacity)
        return counts.clamp(max=self.capacity(experts.shape[0] * experts.shape[1]))

    def _padded(self) -> bool:
        """The padded batched-matmul layout: on the CPU, for experts held whole here. Many small per-expert GEMMs
        (``_grouped_mm`` is a loop there) each end in a thread barrier, which a loaded machine stretches; one
        batched matmul has one. Elsewhere (CUDA, expert-parallel or int8 experts) the sorted layout."""
        weight = self.experts.fc_in_weight if isinstance(self.experts, GroupedExperts) else None
        return weight is not None and weight.device.type == "cpu" and not hasattr(weight, "to_local")

    def _sorted_experts(self, tokens: torch.Tensor, gates: torch.Tensor, flat: torch.Tensor, order: torch.Tensor,
                        kept: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The kept assignments (``kept`` (E,) per expert) as rows sorted by expert through the experts -> (N, C)."""
        if self.cfg.moe_capacity_factor:
            order = order[position < kept[flat[order]]]
        token = order % tokens.shape[0]
        ys = self.experts(tokens[token], kept)  # (M, C), M = kept assignments
        weighted = ys * gates.t().reshape(-1)[order].unsqueeze(1).to(ys.dtype)
        return ys.new_zeros(tokens.shape).index_add(0, token, weighted)

    def _padded_experts(self, tokens: torch.Tensor, gates: torch.Tensor, flat: torch.Tensor, order: torch.Tensor,
                        kept: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Expert e's kept assignments (``kept`` (E,) per expert) in rows [e W, e W + kept_e) of an (E, W, C) block,
        W the largest kept count (FLOPs on E W rows instead of k N) -> (N, C)."""
        (N, C), k, E = tokens.shape, self.cfg.moe_top_k, self.cfg.moe_experts
        width = int(kept.max())
        keep = position < kept[flat[order]]
        slot = (flat[order] * width + position)[keep]  # padded row of each kept assignment
        assignment = order[keep] % N * k + order[keep] // N  # token-major: token i's choices at i k .. i k + k - 1
        to_slot = torch.full((N * k,), E * width, device=tokens.device)  # assignment -> its row (E W: dropped)
        to_slot[assignment] = slot
        from_slot = torch.full((E * width,), N * k, device=tokens.device)  # row -> its assignment (k N: padding)
        from_slot[slot] = assignment
        dropped, padded = bool(kept.sum() < N * k), bool(kept.sum() < E * width)  # the zero rows needed
        source = torch.div(from_slot, k, rounding_mode="floor") % N  # padding rows read token 0, never used
        xin = _Gather.apply(tokens, source, to_slot, k, (False, dropped))
        ys = self.experts(xin.view(E, width, C), kept).reshape(E * width, C)
        picked = _Gather.apply(ys, to_slot, from_slot, 1, (dropped, padded)).view(N, k, C)  # dropped ones: 0
        out = torch.bmm(gates.unsqueeze(1).to(picked.dtype), picked)  # the gated sum as one batched product
        return out.view(N, C)

    def _aux(self, out: torch.Tensor, counts: torch.Tensor, scores: torch.Tensor, logits: torch.Tensor,
             dropped: int) -> torch.Tensor:
        """Weighted auxiliary losses of this forward, recorded for the loss (or attached to ``out``), and the step's
        statistics accumulated."""
        cfg, n_assign = self.cfg, counts.sum()
        probs = scores if cfg.moe_score == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
        whole = self.sequence_counts(counts) if self.sequence_counts is not None else counts
        # 1 when uniform; under cp the mean of the ranks' values (their own tokens' probabilities) is the whole's
        balance = cfg.moe_experts * (whole.float() / whole.sum() * probs.mean(dim=0)).sum()
        aux = torch.zeros((), device=out.device)
        if "aux" in cfg.moe_balance and cfg.moe_aux_loss_coef:
            aux = aux + cfg.moe_aux_loss_coef * balance
        if cfg.moe_z_loss_coef:
            aux = aux + cfg.moe_z_loss_coef * torch.logsumexp(logits, dim=-1).square().mean()
        with torch.no_grad():
            self.tokens_per_expert += counts.to(self.tokens_per_expert.dtype)
            self.stats += torch.stack([n_assign.float(), torch.tensor(float(dropped), device=out.device),
                                       balance.detach(), torch.ones((), device=out.device)])
        if not aux.requires_grad:
            return out
        if self.aux_grad_scale is not None:
            return _AttachAuxLoss.apply(out, aux, self.aux_grad_scale)
        self._aux_loss = aux if self._aux_loss is None else self._aux_loss + aux
        return out

    def take_aux_loss(self) -> torch.Tensor | None:
        """The weighted auxiliary loss recorded since the last call (None if none), for the model's loss."""
        aux, self._aux_loss = self._aux_loss, None
        return aux


def moe_layers(model: nn.Module) -> Iterator[tuple[str, MoE]]:
    """The (name, module) of every MoE layer ``model`` holds."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, MoE))


@torch.no_grad()
def update_expert_bias(model: nn.Module, counts: dict[str, torch.Tensor]) -> None:
    """Auxiliary-loss-free balancing (DeepSeek-V3): b_e += rate * sign(mean load - load_e) from the step's
    token counts per expert (``counts``: layer name -> (E,), summed over the data-parallel ranks)."""
    for name, moe in moe_layers(model):
        if moe.router.use_bias and name in counts:
            load = counts[name].to(moe.router.expert_bias)
            moe.router.expert_bias += moe.cfg.moe_bias_update_rate * torch.sign(load.mean() - load)


@torch.no_grad()
def take_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each MoE layer's statistics since the last call, reset: (E,) token counts followed by assignments,
    dropped assignments, summed balance loss and forward count; layer name -> (E + 4,)."""
    out = {}
    for name, moe in moe_layers(model):
        out[name] = torch.cat([moe.tokens_per_expert, moe.stats])
        moe.tokens_per_expert.zero_()
        moe.stats.zero_()
    return out
