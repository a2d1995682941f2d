"""fp32 inference layout (``FP32Linear``): the same weights laid out once for the CPU's GEMM kernel.

Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth.
Measured on torch 2.13, x86 CPU, 1 thread, gpt2-small shapes, milliseconds per call at batch 1 / batch 8:

    layer (in x out)     nn.Linear      (in, out) fp32   fbgemm int8    onednn int8    _weight_int8pack_mm
    768 x 3072           0.33 / 1.01    0.32 / 0.49      0.11 / 0.13    0.22 / 0.26    ~1.1 / ~22
    3072 x 768           0.33 / 1.08    0.31 / 0.37      0.12 / 0.10    0.23 / 0.32    ~0.9 / ~10
    768 x 50304 (head)   9.5 / 41       ~12 / 26         1.5 / 2.2      1.8 / 2.5      ~58 / ~186

At batch 1 every layout streams the weights at about the memory bandwidth; at batch 2-32 the layout decides.
All 49 gpt2-small Linears in a row (2 threads, milliseconds at batch 1 / batch 8, noisy VM):
nn.Linear's (out, in) 21 / 58-73, (in, out) contiguous with ``addmm`` (Hugging Face's Conv1D
layout) 20 / 36-47, oneDNN's prepacked blocked layout 22-24 / 31-39. End to end, greedy
decoding at batch 8 went from 166 to 186 tokens/s (2 threads) and from 78 to 106 (1 thread)
with oneDNN, while batch 1 lost about 7 % (34.6 vs 37.4 tokens/s, alternating runs: oneDNN
adds ~25 us per call). So engines that decode batches use oneDNN where the build has it, and
engines for one sequence at a time (``max_batch_size=1``) use (in, out) + ``addmm``.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this build runs oneDNN's prepacked fp32 Linear (x86 and Arm builds usually do)."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2))
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2), packed, None, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return True


class FP32Linear(nn.Module):
    """y = x W^T + b with W laid out once, at load time, for the CPU's GEMM kernels (see above).

    An fp32 W is reordered into oneDNN's blocked layout where the build has oneDNN
    (``torch.ops.mkldnn._reorder_linear_weight``, the form Inductor's CPU backend gives frozen
    Linear weights); otherwise it is stored (in, out) contiguous for ``addmm``. Either way the
    layer holds its own copy (the tied output layer too: the embedding keeps the original for
    lookups). An inference format, not a save format: the buffers are not in the state dict,
    and a oneDNN weight cannot be deep-copied.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        fp32 = weight.dtype == torch.float32
        self.onednn = fp32 and onednn_linear_available() if onednn is None else onednn
        weight = weight.detach().contiguous()
        laid_out = torch.ops.mkldnn._reorder_linear_weight(weight) if self.onednn else weight.t().contiguous()
        self.register_buffer("weight", laid_out, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, onednn: bool | None = None) -> FP32Linear:
        return cls(linear.weight, linear.bias, onednn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.onednn:
            parts = x2.split(ONEDNN_MAX_ROWS)
            y = self._onednn(x2) if len(parts) == 1 else torch.cat([self._onednn(p) for p in parts])
            return y.view(*x.shape[:-1], self.out_features)
        y = x2 @ self.weight if self.bias is None else torch.addmm(self.bias, x2, self.weight)
        return y.view(*x.shape[:-1], self.out_features)

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        """oneDNN on ``x`` (at most ONEDNN_MAX_ROWS rows) padded to its ``row_bucket``."""
        rows = x.shape[0]
        padded = row_bucket(rows)
        if padded != rows:
            x = torch.nn.functional.pad(x, (0, 0, 0, padded - rows))
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")[:rows]

    def extra_repr(self) -> str:
        layout = "onednn" if self.onednn else "(in, out)"
        return f"in_features={self.in_features}, out_features={self.out_features}, layout={layout}"


ONEDNN_MAX_ROWS = 128  # rows per oneDNN call: a longer prefill is computed in pieces of this many


def row_bucket(rows: int) -> int:
    """The row count a oneDNN call of ``rows`` rows is padded to: exact up to 16, then the next of
    8 steps per power of two (at most 12.5 % more rows).

    oneDNN (with ideep's cache in front of it) compiles and keeps a kernel per input shape, ~0.5 MB
    each, up to 1024 of them: prompts of every length times every batch size filled that, and a
    server's memory grew by ~0.5 MB per request of a new shape. Pieces of at most 128 rows padded to
    these sizes make 40 shapes per weight, so memory stops growing after a short warm-up; the padding
    costs < 12.5 % of a prefill, the pieces (the weights read once per 128 rows) ~5 %.
    """
    if rows <= 16:
        return rows
    step = 1 << (rows.bit_length() - 4)  # an eighth of the power of two below ``rows``
    return -(-rows // step) * step
