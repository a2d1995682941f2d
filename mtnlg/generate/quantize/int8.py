"""int8 inference layout (``Int8Linear``): fbgemm's dynamic int8 linear (``quantized::linear_dynamic``).

Weights int8 with one scale per output row (symmetric), each call quantizes its activations per
tensor to 7-bit unsigned (``reduce_range``, which keeps fbgemm's 16-bit pairwise sums from
saturating) and accumulates in int32; about 1.5-2% relative error per layer and 4x fewer bytes.
onednn's kernel is more accurate (full 8-bit activations, ~1%) but the activation quantization
it needs from Python costs more than it saves at these sizes; weight-only
``_weight_int8pack_mm`` dequantizes inside and is far slower (the table in ``fp32``). torchao
0.18's CPU paths (measured on torch 2.13, all 49 gpt2-small layers, 2 threads, ms at batch 1 / 8;
fbgemm here 9.8-11 / 13-16): int8 dynamic activation + int8 weight 103 / 129 eager, 17 / 28 under
``torch.compile`` (60 s to compile); int8 weight-only 82 / 103 eager, 68 / 110 compiled. So
fbgemm stays, and torchao is not a dependency.

Caveat: fbgemm's packed weights are built from a per-channel quantized tensor, and PyTorch has
deprecated quantized tensors (pytorch/pytorch#184982); they still work in 2.13.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from mtnlg.generate.quantize.packed import LazyPackedLinear


def check_backend(device: torch.device | str) -> None:
    if torch.device(device).type != "cpu":
        raise ValueError(f"int8 inference runs on CPU (fbgemm kernels); got device {device!r}: use bf16 on GPUs")
    if torch.backends.quantized.engine == "none":
        raise ValueError(
            "this PyTorch build has no quantized CPU engine "
            f"(supported: {torch.backends.quantized.supported_engines}); int8 inference is unavailable"
        )


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: W ~= W_q * scale[:, None], W_q in [-127, 127]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (out,)
    return torch.round(w / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(LazyPackedLinear):
    """y = x W^T + b with W stored as int8 rows and fp32 row scales; activations quantized per call.

    ``weight_int8``, ``weight_scale`` and ``bias`` are buffers (saved in the state dict); the
    kernel's packed form (``LazyPackedLinear``) is rebuilt from them on first use and after every
    state-dict load.
    """

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        if weight_int8.dtype != torch.int8 or weight_int8.ndim != 2:
            shape = tuple(weight_int8.shape)
            raise ValueError(f"weight_int8 must be a 2-D int8 tensor, got {weight_int8.dtype} {shape}")
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_scale", weight_scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scale = quantize_weight(linear.weight)
        return cls(q, scale, linear.bias)

    def _pack(self) -> torch.Tensor:
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors are deprecated; the kernels are not yet replaced
            warnings.filterwarnings("ignore", message=".*quantize_per_tensor, torch.quantize_per_channel.*")
            qweight = torch._make_per_channel_quantized_tensor(
                self.weight_int8.cpu(), self.weight_scale.double().cpu(), zero_points, 0
            )
            return torch.ops.quantized.linear_prepack(qweight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).float(), self.packed, True)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
