"""The one place a model for training is made (pretraining, fine-tuning, tests and benchmarks alike)."""

from __future__ import annotations

import torch

from mtnlg.config import Config
from mtnlg.model.gpt import GPT
from mtnlg.parallel.dims import ParallelDims
from mtnlg.parallel.parallelize import parallelize


def build_model(cfg: Config, device: torch.device, dims: ParallelDims | None = None) -> GPT:
    """The one place a model for training is made: this rank's part of it, initialised from train.seed.

    The model is built on the meta device and ``parallelize`` materialises only what this rank
    holds, so every layout (one process included) starts from the same weights. The global
    generator is seeded too: dropout draws from it.
    """
    torch.manual_seed(cfg.train.seed)
    with torch.device("meta"):
        model = GPT(cfg.model)
    return parallelize(model, dims or ParallelDims(dp=1, pp=1, tp=1, world_size=1, device=device), cfg)
