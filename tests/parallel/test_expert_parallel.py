"""Expert parallelism on gloo ranks against one process: ep=2 and ep=4, dropless and capacity routing,
composed with FSDP (ep < dp) and with a pipeline.

Each layout trains 2 steps of the real ``Trainer``; the test process trains the same steps in one process
and compares the first step's gradients, every step's loss and the final weights. The 2-rank world also
resumes a checkpoint the test process saved, under ep=2: its model state (expert biases included) and
optimizer state are the saver's.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor

from mtnlg.config import Config, ModelConfig, ParallelConfig, TrainConfig
from mtnlg.model.moe import GroupedExperts
from mtnlg.parallel.dims import ParallelDims
from mtnlg.train.build import build_model
from mtnlg.train.trainer import Trainer
from tests.harness.dist import run_world
from tests.harness.training import RandomTokens, full_states, world_dims, world_trainer

STEPS = 2
ROUTING = {"dropless": {}, "capacity": {"moe_capacity_factor": 1.0, "moe_balance": "aux+bias"}}


def _config(routing: str, **parallel: Any) -> Config:
    model = ModelConfig(vocab_size=120, seq_len=16, n_layers=2, hidden=32, n_heads=4, padded_vocab_multiple=64,
                        moe_experts=4, moe_top_k=2, moe_every=1, moe_z_loss_coef=1e-3, **ROUTING[routing])
    return Config(model=model, parallel=ParallelConfig(**parallel),
                  train=TrainConfig(micro_batch_size=1, global_batch_size=8, lr=3e-3, warmup_steps=1, steps=STEPS,
                                    eps=1e-6, peak_flops=1e12, device="cpu", out="unused")).validate()


def _full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone() for n, t in tensors.items()}


def _train(cfg: Config, dims: ParallelDims) -> dict[str, Any]:
    model = build_model(cfg, torch.device("cpu"), dims)
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    placed = all(isinstance(p, DTensor) for e in experts for p in e.parameters()) if dims.ep > 1 else True
    trainer = Trainer(cfg, model, RandomTokens(64, cfg.model.seq_len, cfg.model.vocab_size), dims=dims, progress=False)
    grads: list[dict[str, torch.Tensor]] = []
    trainer.optimizer.register_step_pre_hook(
        lambda *_: grads.append(_full({n: p.grad for n, p in model.named_parameters()})) if not grads else None)
    losses = [trainer.train_step().loss for _ in range(STEPS)]
    log = trainer.experts.log_record()
    return {"grads": grads[0], "losses": losses, "final": _full(dict(model.named_parameters())),
            "bias": {n: b.clone() for n, b in model.named_buffers() if n.endswith("expert_bias")},
            "placed": placed, "log": log}


LAYOUTS = {
    2: {"ep2 dropless": ("dropless", dict(ep=2)), "ep2 capacity": ("capacity", dict(ep=2))},
    4: {
        "ep4 capacity": ("capacity", dict(ep=4)),
        "ep2 in dp4 (experts FSDP-sharded over 2)": ("dropless", dict(ep=2)),
        "ep2 x pp2": ("capacity", dict(ep=2, pp=2)),
    },
}


def _world(world_size: int, saved: str) -> dict[str, dict[str, Any]]:
    out = {name: _train(_config(routing, **layout), world_dims(_config(routing, **layout), world_size))
           for name, (routing, layout) in LAYOUTS[world_size].items()}
    if world_size == 2:  # the one-process checkpoint resumed under ep=2
        trainer = world_trainer(_config("capacity", ep=2), Path(saved), 2)
        assert trainer.resume() is not None
        out["resumed"] = full_states(trainer)
    return out


@functools.cache
def _saved_by_one_process() -> tuple[str, dict[str, torch.Tensor]]:
    """A checkpoint of 2 steps with capacity routing (the expert biases moved), and its full states."""
    out = Path(tempfile.mkdtemp(prefix="mtnlg-moe-")) / "run"
    trainer = world_trainer(_config("capacity"), out, 1)
    for _ in range(STEPS):
        trainer.train_step()
    trainer.save()
    return str(out), full_states(trainer)


@functools.cache
def _results(world_size: int) -> list[dict[str, dict[str, Any]]]:
    return run_world(_world, world_size, world_size, _saved_by_one_process()[0], timeout=240)


@functools.cache
def _reference(routing: str) -> dict[str, Any]:
    return _train(_config(routing), ParallelDims(dp=1, pp=1, tp=1, world_size=1))


def assert_trained_as_one_process(ranks: list[dict[str, Any]], routing: str) -> None:
    """Every rank's ``_train`` result (experts placed, losses, first gradients, final weights, expert biases) is
    one process's within 1e-5, and the ranks together hold every weight."""
    ref = _reference(routing)
    seen = set()
    for rank, got in enumerate(ranks):
        assert got["placed"], rank  # every expert weight is a DTensor
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5), rank
        for kind in ("grads", "final", "bias"):
            for name, value in got[kind].items():
                ref_name = "wte.weight" if name == "lm_head.weight" and name not in ref[kind] else name
                torch.testing.assert_close(value, ref[kind][ref_name], rtol=1e-5, atol=1e-5,
                                           msg=f"rank {rank} {kind} {name}")
        seen |= set(got["final"])
    assert set(ref["final"]) <= seen
    if routing == "capacity":
        assert ref["log"]["moe_dropped"] > 0  # the capacity really dropped tokens
        assert any(b.abs().sum() > 0 for b in ref["bias"].values())  # and the bias moved


@pytest.mark.parametrize(("world_size", "layout"), [(w, n) for w, layouts in LAYOUTS.items() for n in layouts])
def test_expert_parallel_steps_match_one_process(world_size: int, layout: str) -> None:
    assert_trained_as_one_process([r[layout] for r in _results(world_size)], LAYOUTS[world_size][layout][0])


def test_a_one_process_checkpoint_resumes_under_ep2_with_its_states() -> None:
    _, saved = _saved_by_one_process()
    assert any(k.endswith("expert_bias") and v.abs().sum() > 0 for k, v in saved.items())
    for rank, result in enumerate(_results(2)):
        loaded = result["resumed"]
        assert loaded.keys() == saved.keys(), rank
        for name, value in loaded.items():
            assert torch.equal(value, saved[name]), (rank, name)
