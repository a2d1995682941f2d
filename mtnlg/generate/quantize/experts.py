"""A MoE layer's experts in a quantized format (int8 or int4): expert e's Linears as quantized layers
(``fc_in.e``, ``fc_out.e``, and ``fc_gate.e`` for SwiGLU experts), run on the rows routed to it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mtnlg.model.moe import GroupedExperts

MakeLayer = Callable[[torch.Tensor, torch.Tensor | None], nn.Module]  # (weight (out, in), bias) -> a layer


class QuantizedExperts(nn.Module):
    """A drop-in for ``GroupedExperts`` whose experts are quantized Linear layers, one per expert."""

    def __init__(self, fc_in: list[nn.Module], fc_out: list[nn.Module], approximate: str,
                 fc_gate: list[nn.Module] | None = None) -> None:
        super().__init__()
        self.fc_in, self.fc_out = nn.ModuleList(fc_in), nn.ModuleList(fc_out)
        self.fc_gate = nn.ModuleList(fc_gate) if fc_gate else None
        self.approximate = approximate

    @classmethod
    def from_grouped(cls, experts: GroupedExperts, make: MakeLayer) -> QuantizedExperts:
        """Each expert's weights through ``make`` (e.g. ``Int8Linear`` of ``quantize_weight``'s output)."""

        def layers(part: str) -> list[nn.Module]:
            weight, bias = getattr(experts, f"{part}_weight"), getattr(experts, f"{part}_bias")
            biases = bias if bias is not None else [None] * len(weight)
            return [make(w, b) for w, b in zip(weight, biases, strict=True)]

        gate = layers("fc_gate") if experts.fc_gate_weight is not None else None
        return cls(layers("fc_in"), layers("fc_out"), experts.approximate, gate)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.fc_gate is not None:
            return self.fc_out[e](torch.nn.functional.silu(self.fc_gate[e](x)) * self.fc_in[e](x))
        return self.fc_out[e](torch.nn.functional.gelu(self.fc_in[e](x), approximate=self.approximate))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        chunks = x.split(counts.tolist())
        return torch.cat([self._expert(e, chunk) if len(chunk) else chunk for e, chunk in enumerate(chunks)])
