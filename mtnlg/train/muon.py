"""Muon for the blocks' hidden matrices, AdamW for everything else, as one optimizer object.

Muon (Jordan et al. 2024; ``torch.optim.Muon``) replaces each 2-D hidden matrix's update by the
orthogonalised momentum (a Newton-Schulz quintic), which equalises the update's singular values.
The standard split keeps AdamW for embeddings, the output layer, norms, biases (the experts' stacked
(E, F) biases too) and the MoE router, whose geometry is not a linear map between hidden states. The
stacked expert weights (E, out, in) are E matrices: each is orthogonalised on its own, with its own
(out, in) learning-rate scale, as if it were a dense layer's.

``MuonAdamW`` is one ``torch.optim.Optimizer`` whose ``param_groups`` and ``state`` are those of an
inner ``torch.optim.Muon`` and an inner ``torch.optim.AdamW`` (shared, not copied), so the LR
schedule (which sets ``group["lr"]``), gradient scaling, step hooks and DCP's optimizer state dict
see one optimizer, and the saved state is each inner optimizer's own (``momentum_buffer``;
``step``, ``exp_avg``, ``exp_avg_sq``). Muon's learning rate is AdamW's: ``adjust_lr_fn =
"match_rms_adamw"`` scales the orthogonal update to AdamW's RMS (Liu et al. 2025, "Muon is scalable"):
lr 0.2 sqrt(max(out, in)), computed here (``adjusted_lr``). torch's Muon takes 2-D parameters only, so
the 3-D expert weights join it as a group added after construction (``add_param_group``).

The step is torch's (``torch.optim.Muon``'s update, op for op, tested equal to it) with two changes:
the Newton-Schulz iteration runs in fp32 on CPUs (torch's runs in bf16, the GPU's fast type; see
``ns_dtype``), and sharded matrices (FSDP2 and tensor parallelism make them DTensors) are handled: the
momentum is elementwise and stays sharded, but the orthogonalisation needs the whole matrix, so each
step gathers the update (``full_tensor``), orthogonalises it on every rank the same way, and applies
this rank's shard (``distribute_tensor`` without communication). The multi-rank tests prove it equal
to one process.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from mtnlg.model.moe import GroupedExperts, Router


def muon_parameter_names(model: nn.Module) -> set[str]:
    """The parameters Muon updates: 2-D matrices inside the blocks, except the MoE router's and the experts'
    stacked biases, and the experts' stacked 3-D weights."""
    def names(kind: type) -> set[str]:
        return {f"{name}.{p}" for name, module in model.named_modules() if isinstance(module, kind)
                for p, _ in module.named_parameters()}

    routers, experts = names(Router), names(GroupedExperts)
    return {name for name, p in model.named_parameters() if p.requires_grad and name.startswith("blocks.")
            and name not in routers and (p.dim() == 3 if name in experts else p.dim() == 2)}


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's learning-rate scale for one (out, in) matrix (the last two dimensions)."""
    rows, cols = shape[-2:]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


class MuonAdamW(torch.optim.Optimizer):
    """``muon_groups`` stepped by Muon, ``adamw_groups`` by AdamW; one set of groups and state (see above)."""

    def __init__(self, muon_groups: list[dict[str, Any]], adamw_groups: list[dict[str, Any]], *,
                 lr: float, momentum: float, adamw: dict[str, Any]) -> None:
        flat = [{**g, "params": [p for p in g["params"] if p.dim() == 2]} for g in muon_groups]
        stacked = [{**g, "params": [p for p in g["params"] if p.dim() == 3]} for g in muon_groups]
        self.muon = torch.optim.Muon([g for g in flat if g["params"]] or [{"params": []}], lr=lr, momentum=momentum,
                                     nesterov=True, adjust_lr_fn="match_rms_adamw")
        for group in (g for g in stacked if g["params"]):
            self.muon.add_param_group(group)  # torch's 2-D check is in its constructor; the step is ours
        self.adamw = torch.optim.AdamW(adamw_groups or [{"params": []}], lr=lr, **adamw)
        super().__init__([{"params": []}], {"lr": lr})  # a placeholder group, replaced by the inner ones
        self.param_groups = self.muon.param_groups + self.adamw.param_groups
        self._link()

    def _link(self) -> None:
        """Make this object's groups and state the inner optimizers' (again after ``load_state_dict``)."""
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._muon_step()
        self.adamw.step()
        return loss

    def _muon_step(self) -> None:
        """``torch.optim.Muon``'s update (its ``_single_tensor_muon``), orthogonalising the gathered matrix."""
        for group in self.muon.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                whole = update.full_tensor() if isinstance(update, DTensor) else update
                matrices = whole.unbind(0) if whole.dim() == 3 else (whole,)
                ortho = torch.stack([orthogonalise(m, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                                   ns_dtype(whole.device)) for m in matrices]).view_as(whole)
                if isinstance(p, DTensor):
                    ortho = distribute_tensor(ortho, p.device_mesh, p.placements, src_data_rank=None)
                p.mul_(1 - lr * wd)
                p.add_(ortho.to(p.dtype), alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))


def ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (torch's choice: tensor cores); fp32 on CPUs, whose bf16 matmuls (without AMX) are slower
    than fp32's, and where a 1-ulp difference of a gradient then stays 1 ulp of the update."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def orthogonalise(grad: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``torch.optim.Muon``'s quintic Newton-Schulz iteration, op for op, in ``dtype`` (torch's: bf16)."""
    a, b, c = coefficients
    x = grad.to(dtype, copy=True)
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # spectral norm <= Frobenius norm = 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def build_muon(model: nn.Module, groups: Iterable[dict[str, Any]], lr: float, momentum: float,
               adamw: dict[str, Any]) -> MuonAdamW:
    """Split AdamW's ``groups`` (decay / no decay): Muon's matrices leave them for one decayed Muon group."""
    ids = {id(p) for name, p in model.named_parameters() if name in muon_parameter_names(model)}
    muon_params: list[torch.Tensor] = []
    adamw_groups = []
    for g in groups:
        params = list(g["params"])
        muon_params += [p for p in params if id(p) in ids]
        adamw_groups.append({**g, "params": [p for p in params if id(p) not in ids]})
    decay = next(g["weight_decay"] for g in adamw_groups)
    muon_groups = [{"params": muon_params, "weight_decay": decay}]
    return MuonAdamW(muon_groups, [g for g in adamw_groups if g["params"]], lr=lr, momentum=momentum, adamw=adamw)
