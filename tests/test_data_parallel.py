"""Data parallelism (FSDP2, HSDP, and with tp and pp) on gloo ranks against one process.

Each layout trains 5 steps of the real ``Trainer`` on a global batch of 8; the test process runs
the same 5 steps in one process and compares the initial weights (bit for bit), every step's
loss and the final weights.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from dist_harness import run_world
from test_trainer import RandomTokens
from torch.distributed.tensor import DTensor

from mtnlg.config import Config, ModelConfig, ParallelConfig, TrainConfig
from mtnlg.parallel import ParallelDims
from mtnlg.train.trainer import Trainer, build_model

STEPS = 5


def _config(**parallel: Any) -> Config:
    return Config(
        model=ModelConfig(vocab_size=120, seq_len=16, n_layers=4, hidden=32, n_heads=4, padded_vocab_multiple=64),
        parallel=ParallelConfig(**parallel),
        # AdamW's eps 1e-6 (LLaMA uses 1e-5): with 1e-8 a gradient that is pure rounding noise (the key
        # bias, which softmax ignores; a dead GELU unit) is blown up to a full step of random sign.
        train=TrainConfig(micro_batch_size=1, global_batch_size=8, lr=3e-3, warmup_steps=1, steps=STEPS, eps=1e-6,
                          peak_flops=1e12, device="cpu", out="unused"),
    ).validate()


def _full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's parameters as whole tensors (collective over each parameter's dp x tp mesh)."""
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in model.named_parameters()}


def _train(cfg: Config, dims: ParallelDims) -> dict[str, Any]:
    model = build_model(cfg, torch.device("cpu"), dims)
    initial = _full_weights(model)
    data = RandomTokens(64, cfg.model.seq_len, cfg.model.vocab_size)
    trainer = Trainer(cfg, model, data, dims=dims, progress=False)
    losses = [trainer.train_step().loss for _ in range(STEPS)]
    return {"initial": initial, "losses": losses, "final": _full_weights(model)}


LAYOUTS = {
    2: {"dp2": {}, "dp2 replicated (DDP-like)": dict(dp_replicate=2)},
    4: {
        "dp4": {},
        "HSDP 2 x 2": dict(dp_replicate=2),
        "dp2 x tp2": dict(tp=2),
        "dp2 x pp2": dict(pp=2),
        "dp2 x pp2 interleaved": dict(pp=2, pp_schedule="interleaved_1f1b", pp_stages_per_rank=2),
    },
}


def _world(world_size: int) -> dict[str, dict[str, Any]]:
    out = {}
    for name, layout in LAYOUTS[world_size].items():
        cfg = _config(**layout)
        dims = ParallelDims.from_config(cfg.parallel, world_size)
        dims.build_mesh()
        out[name] = _train(cfg, dims)
    return out


@functools.cache
def _results(world_size: int) -> list[dict[str, dict[str, Any]]]:
    return run_world(_world, world_size, world_size, timeout=240)


@functools.cache
def _reference() -> dict[str, Any]:
    cfg = _config()
    return _train(cfg, ParallelDims(dp=1, pp=1, tp=1, world_size=1))


@pytest.mark.parametrize(("world_size", "layout"), [(w, n) for w, layouts in LAYOUTS.items() for n in layouts])
def test_five_steps_match_one_process(world_size: int, layout: str) -> None:
    ref = _reference()
    seen = set()
    for rank, result in enumerate(_results(world_size)):
        got = result[layout]
        for name, value in got["initial"].items():
            ref_name = "wte.weight" if name == "lm_head.weight" and name not in ref["initial"] else name
            assert torch.equal(value, ref["initial"][ref_name]), (rank, name)  # the same init, bit for bit
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5), rank
        for name, value in got["final"].items():
            ref_name = "wte.weight" if name == "lm_head.weight" and name not in ref["final"] else name
            torch.testing.assert_close(value, ref["final"][ref_name], rtol=1e-5, atol=1e-5, msg=f"rank {rank} {name}")
        seen |= set(got["final"])
    assert {n for n in ref["final"]} <= seen  # every parameter was compared on some rank
