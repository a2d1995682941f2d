"""What training tests share: an in-memory dataset, a small run's config and trainer, its logged
losses, and the same on a gloo world (``world_size`` 1: one process)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from mtnlg.config import Config, TrainConfig
from mtnlg.parallel.dims import ParallelDims
from mtnlg.train.build import build_model
from mtnlg.train.metrics import read_log
from mtnlg.train.trainer import Trainer


class RandomTokens:
    """An in-memory dataset with the trainer's interface: ``len`` and int64 samples of seq_len + 1."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0) -> None:
        self.data = np.random.default_rng(seed).integers(0, vocab, size=(n, seq_len + 1), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.data[i]


def make_config(model_cfg, out, **train) -> Config:
    defaults = dict(micro_batch_size=2, global_batch_size=4, steps=6, lr=1e-3, warmup_steps=2, eval_interval=3,
                    eval_iters=2, log_interval=1, save_interval=3, peak_flops=1e12, out=str(out), device="cpu")
    return Config(model=dataclasses.replace(model_cfg), train=TrainConfig(**{**defaults, **train})).validate()


def make_trainer(cfg: Config, data=None) -> Trainer:
    data = data or RandomTokens(64, cfg.model.seq_len, cfg.model.vocab_size)
    valid = RandomTokens(8, cfg.model.seq_len, cfg.model.vocab_size, seed=1)
    return Trainer(cfg, build_model(cfg, torch.device("cpu")), data, valid, progress=False)


def train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(run_dir / "log.jsonl") if r["kind"] == "train"}


def world_dims(cfg: Config, world_size: int) -> ParallelDims:
    """The layout of ``cfg`` on this world, its mesh built when there is more than one rank."""
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    if world_size > 1:
        dims.build_mesh()
    return dims


def full_states(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Model and optimizer state by flattened name, every entry whole (collective)."""
    options = StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True)
    model, optim = get_state_dict(trainer.model, trainer.optimizer, options=options)
    states = {f"model.{k}": v for k, v in model.items()} | {f"optim.{k}": v for k, v in optim.items()}
    return {k: v for k, v in states.items() if isinstance(v, torch.Tensor)}


def world_trainer(cfg: Config, out: Path, world_size: int) -> Trainer:
    """A trainer of ``cfg`` writing to ``out``, on this world (1: one process)."""
    cfg.train.out = str(out)
    dims = world_dims(cfg, world_size)
    data = RandomTokens(64, cfg.model.seq_len, cfg.model.vocab_size)
    return Trainer(cfg, build_model(cfg, torch.device("cpu"), dims), data, dims=dims, progress=False)
