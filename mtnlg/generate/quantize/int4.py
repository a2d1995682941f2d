"""int4 weight-only inference layout (``Int4Linear``): 4-bit weights in groups of input columns.

Each output row's weights are cut into groups of ``group_size`` consecutive input columns (128 by
default; the kernel takes 32, 64, 128 or 256), and each group gets its own scale and offset:
``w ~= (q - 8) * scale + offset`` with ``q`` in [0, 15], two per byte. **Asymmetric** (min/max per
group, offset = min + 8 * scale) rather than symmetric: with only 16 levels, a symmetric grid
spans [-max|w|, max|w|] and leaves the levels on the short side of a skewed group unused, and
PyTorch's int4 kernels take (scale, offset) pairs anyway, so the offset costs nothing at run
time. 4.5 bits per weight with group 128 (the scales and offsets are fp32 on disk: 0.5 byte per
weight + 8 bytes per group).

The matmul is ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (torch >= 2.6), chosen by
measurement against a dequantize-on-the-fly matmul (unpack the nibbles, scale, then fp32 GEMM)
and fp32 (torch 2.13, AMD EPYC with AVX2 only, 1 thread, load ~4.5, ms per call, batch 1 / 8):

    layer (in x out)     fp32 (in, out)   int4 kernel (bf16 x)   dequantize on the fly
    768 x 2304           0.82 / 3.7       1.04 / 2.7             86 / 112
    768 x 768            0.09 / 1.1       0.54 / 1.6             5.3 / 8.7
    768 x 3072           1.27 / 14        1.25 / 5.0             126 / 143
    3072 x 768           3.17 / 9.1       1.45 / 4.3             91 / 74
    768 x 50304 (head)   32 / 115         17 / 52                1716 / 1531

Dequantizing writes a full fp32 matrix per call (more bytes than the fp32 weights themselves),
so it is never the choice. The kernel's float32-activation path is a slow reference loop (9.8 ms
for 768 x 3072 at batch 1), so activations go in as bfloat16 (about 0.4 % relative rounding,
small beside int4's own error) and come back as fp32. The kernel needs ``out_features`` a
multiple of 16; a layer that is not (or a build without the kernel) is dequantized once, at
load, and runs as fp32 (correct, without the memory saving).

On disk (``model-int4.safetensors``) each layer stores ``weight_int4`` (uint8, out x in/2: column
2j in the high nibble, 2j+1 in the low), ``weight_scale`` and ``weight_offset`` (fp32, out x
in/group) and ``bias``; the group size is in/group.
"""

from __future__ import annotations

import torch
from torch import nn

from mtnlg.generate.quantize.packed import LazyPackedLinear

GROUP_SIZES = (256, 128, 64, 32)  # what the kernel takes
DEFAULT_GROUP_SIZE = 128
KERNEL_ROWS = 16  # the kernel packs output rows in blocks of 16


def check_int4_device(device: torch.device | str) -> None:
    if torch.device(device).type != "cpu":
        raise ValueError(f"int4 inference runs on CPU (torch's int4 CPU kernel); got device {device!r}: "
                         "use bf16 on GPUs")


def group_for(in_features: int, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """The group a layer of ``in_features`` inputs uses: the largest of the kernel's sizes that is at
    most ``group_size`` and divides ``in_features``."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    for g in GROUP_SIZES:
        if g <= group_size and in_features % g == 0:
            return g
    raise ValueError(f"int4 needs in_features divisible by {GROUP_SIZES[-1]}, got a layer with {in_features}")


def quantize_int4(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[torch.Tensor, ...]:
    """(packed uint8 (out, in/2), scale (out, in/g), offset (out, in/g)) of an (out, in) weight:
    asymmetric per group of ``group_for(in, group_size)`` input columns."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    g = group_for(in_features, group_size)
    groups = w.reshape(out_features, in_features // g, g)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = ((groups - low.unsqueeze(-1)) / scale.unsqueeze(-1)).round().clamp(0, 15).to(torch.uint8)
    q = q.reshape(out_features, in_features)
    return (q[:, 0::2] << 4) | q[:, 1::2], scale, low + 8 * scale


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The (out, in) int32 levels in [0, 15] of a packed (out, in/2) uint8 weight."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1).to(torch.int32)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The fp32 (out, in) weight the int4 levels stand for."""
    q = unpack_int4(packed).float()
    out_features, in_features = q.shape
    g = in_features // scale.shape[1]
    w = (q.view(out_features, -1, g) - 8) * scale.unsqueeze(-1) + offset.unsqueeze(-1)
    return w.reshape(out_features, in_features)


def int4_kernel_available() -> bool:
    try:
        return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    except (AttributeError, RuntimeError):
        return False


class Int4Linear(LazyPackedLinear):
    """y = x W^T + b with W in 4-bit groups (see the module's docstring); a drop-in for nn.Linear.

    ``weight_int4``, ``weight_scale``, ``weight_offset`` and ``bias`` are buffers (saved in the state
    dict); the kernel's packed form (``LazyPackedLinear``) is rebuilt from them on first use and after
    every state-dict load.
    """

    def __init__(self, weight_int4: torch.Tensor, weight_scale: torch.Tensor, weight_offset: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        if weight_int4.dtype != torch.uint8 or weight_int4.ndim != 2:
            shape = tuple(weight_int4.shape)
            raise ValueError(f"weight_int4 must be a 2-D uint8 tensor, got {weight_int4.dtype} {shape}")
        self.out_features, self.in_features = weight_int4.shape[0], 2 * weight_int4.shape[1]
        self.group_size = self.in_features // max(weight_scale.shape[-1], 1)
        self.register_buffer("weight_int4", weight_int4)
        self.register_buffer("weight_scale", weight_scale.float())
        self.register_buffer("weight_offset", weight_offset.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE) -> Int4Linear:
        return cls(*quantize_int4(linear.weight, group_size), linear.bias)

    @property
    def uses_kernel(self) -> bool:
        return (int4_kernel_available() and self.out_features % KERNEL_ROWS == 0
                and self.group_size in GROUP_SIZES and self.in_features % self.group_size == 0)

    def _pack(self) -> tuple[torch.Tensor, ...]:
        if not self.uses_kernel:  # dequantized once: fp32 speed, (in, out) for addmm
            return (dequantize_int4(self.weight_int4, self.weight_scale, self.weight_offset).t().contiguous(),)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(self.weight_int4), 1)
        scales_and_offsets = torch.stack([self.weight_scale, self.weight_offset], dim=-1)  # (out, in/g, 2)
        return packed, scales_and_offsets.transpose(0, 1).contiguous().bfloat16()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        packed = self.packed
        if len(packed) == 1:
            w = packed[0]
            y = x2.float() @ w if self.bias is None else torch.addmm(self.bias, x2.float(), w)
        else:
            weights, scales = packed
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.bfloat16(), weights, self.group_size, scales).float()
            if self.bias is not None:
                y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}, kernel={self.uses_kernel}")
