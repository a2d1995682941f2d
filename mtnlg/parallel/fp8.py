"""``train.precision=fp8``: torchao's float8 linear layers, with FSDP2's float8 all-gather.

torchao (``convert_to_float8_training``) swaps the blocks' ``nn.Linear`` layers for ``Float8Linear``:
the matmuls of forward and backward run in float8 with dynamic (tensorwise) scales, everything else in
bf16 as under ``precision=bf16``; with FSDP the weights are cast to float8 before the all-gather
(``enable_fsdp_float8_all_gather``), halving its bytes. Float8 tensor cores exist from compute
capability 8.9 (Ada, Hopper) on, so everywhere else the run is refused before any weight is built.
torchao is optional (``pip install torchao``) and imported only here.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from mtnlg.config import Config, ConfigError
from mtnlg.parallel.dims import ParallelDims
from mtnlg.util.extras import missing_package_message

MIN_CAPABILITY = (8, 9)


def check_fp8(cfg: Config, device: torch.device) -> None:
    """A one-line ConfigError unless ``device`` and this build can train in float8."""
    if cfg.train.precision != "fp8":
        return
    need = "train.precision=fp8 needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper) and torchao"
    if device.type != "cuda":
        raise ConfigError(f"{need}; this run is on {device.type}: use train.precision=bf16")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ConfigError(f"{need}; this GPU is {capability[0]}.{capability[1]}: use train.precision=bf16")
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"{need}; {missing_package_message('torchao')}")
    if cfg.parallel.tp > 1:
        raise ConfigError("train.precision=fp8 with parallel.tp > 1 is not supported: use parallel.tp=1")


def _float8_friendly(module: nn.Module, fqn: str) -> bool:
    """The blocks' linears whose both dimensions are multiples of 16 (float8 GEMMs' alignment)."""
    return (fqn.startswith("blocks.") and isinstance(module, nn.Linear)
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def apply_fp8(model: nn.Module, cfg: Config, dims: ParallelDims) -> None:
    """Swap the blocks' linears for torchao's float8 ones in place (before FSDP wraps them)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig(enable_fsdp_float8_all_gather=dims.dp > 1 and cfg.parallel.zero == 3)
    convert_to_float8_training(model, config=config, module_filter_fn=_float8_friendly)
