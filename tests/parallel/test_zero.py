"""The distributed optimizer (``parallel.zero`` 1 and 2) on gloo ranks against one process and FSDP;
Muon (``train.optimizer=muon``) under FSDP, tensor and pipeline parallelism against one process.

One 4-rank world trains 5 steps of the real ``Trainer`` under each layout (the same config as
``test_data_parallel``: its one-process reference is shared), counts the collectives of a step
under 1 and 4 micro-batches, and checks that a zero=1 checkpoint resumes under zero=3, and a Muon
dp2 x tp2 one under dp2 x pp2, with the saver's optimizer state; the test process then resumes the
same checkpoints in one process.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from mtnlg.parallel.zero import ZeroAdamW
from mtnlg.train.trainer import Trainer
from tests.harness.dist import run_world
from tests.harness.training import full_states, world_dims, world_trainer
from tests.parallel.test_data_parallel import STEPS, _config, _reference, _train

# zero 1 and 2 differ only in the reduction (all-reduce or reduce-scatter), which every layout
# below runs through one bucket code; each composition is tested once, under one of them.
LAYOUTS = {
    "zero1 dp4": dict(zero=1),
    "zero2 dp4": dict(zero=2),
    "zero2 dp2 x tp2": dict(zero=2, tp=2, sequence_parallel=True),
    "zero2 dp2 x pp2 interleaved": dict(zero=2, pp=2, pp_schedule="interleaved_1f1b", pp_stages_per_rank=2),
    "zero1 dp2 x pp2 dualpipev": dict(zero=1, pp=2, pp_schedule="dualpipev", pp_stages_per_rank=2),
    "zero2 dp2 x cp2": dict(zero=2, cp=2),  # the buckets are reduced over dp x cp
}
# Muon orthogonalises whole matrices: FSDP's row shards and tp's row and column shards are gathered.
MUON_LAYOUTS = {"muon dp4": {}, "muon dp2 x tp2": dict(tp=2), "muon dp2 x pp2": dict(pp=2)}
COLLECTIVES = ("all_reduce", "reduce_scatter_single", "all_gather_single")


def _count_step(trainer: Trainer) -> dict[str, list[int]]:
    """The data-parallel collectives (and the bytes each sent) of one training step, counted at torch.distributed."""
    seen: dict[str, list[int]] = {name: [] for name in COLLECTIVES}
    originals = {name: getattr(dist, name) for name in COLLECTIVES}
    dp_group = trainer.dims.dp_group

    def counted(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            tensor = args[1] if name != "all_reduce" else args[0]
            if kwargs.get("group") is dp_group and tensor.numel() > 1:  # not the step's mean loss
                seen[name].append(tensor.numel() * tensor.element_size())
            return originals[name](*args, **kwargs)
        return call

    for name in COLLECTIVES:
        setattr(dist, name, counted(name))
    try:
        trainer.train_step()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return seen


def _collectives(checkpoints: Path) -> dict[str, Any]:
    """zero=1 and 2 on dp4 with small buckets: the same collectives under 1 and 4 micro-batches per rank,
    launched during backward."""
    out: dict[str, Any] = {}
    for zero in (1, 2):
        counts = []
        for batch in (4, 16):
            cfg = _config(zero=zero, bucket_mb=0.01)
            cfg.train.global_batch_size = batch
            trainer = world_trainer(cfg, checkpoints / "unused", 4)
            counts.append(_count_step(trainer))
        zero_opt = trainer.optimizer
        assert isinstance(zero_opt, ZeroAdamW)
        out[f"zero{zero}"] = {"counts": counts, "buckets": len(zero_opt.buckets),
                              "expected": zero_opt.collectives(), "state_bytes": zero_opt.state_bytes()}
    return out


def _overlap() -> int:
    """Buckets whose reduction was launched before backward returned (by the gradient hooks)."""
    cfg = _config(zero=1, bucket_mb=0.01)
    cfg.train.global_batch_size = 4
    trainer = world_trainer(cfg, Path("unused"), 4)
    optimizer = trainer.optimizer
    assert isinstance(optimizer, ZeroAdamW)
    trainer._forward_backward(1)
    launched = optimizer._next
    optimizer.finish_gradient_reduction()
    return launched


def _resharded(saver_cfg: Any, loader_cfg: Any, directory: Path) -> dict[str, Any]:
    """A checkpoint after one step in one layout, then resumed in another."""
    saver = world_trainer(saver_cfg, directory, 4)
    saver.train_step()
    saver.save()
    saved = full_states(saver)
    loader = world_trainer(loader_cfg, directory, 4)
    assert loader.resume() is not None
    return {"saved": saved, "loaded": full_states(loader)}


def _muon_config(**parallel: Any) -> Any:
    cfg = _config(**parallel)
    cfg.train.optimizer = "muon"
    return cfg


# name -> (saving layout, resuming layout, the one-process config resuming it too)
RESHARDS = {"zero1": (lambda: _config(zero=1, tp=2), lambda: _config(zero=3, tp=2), _config),
            "muon": (lambda: _muon_config(tp=2), lambda: _muon_config(pp=2), _muon_config)}


def _world(checkpoints: str) -> dict[str, Any]:
    root = Path(checkpoints)
    results: dict[str, Any] = {name: _train(_config(**layout), world_dims(_config(**layout), 4))
                               for name, layout in LAYOUTS.items()}
    results |= {name: _train(_muon_config(**layout), world_dims(_muon_config(**layout), 4))
                for name, layout in MUON_LAYOUTS.items()}
    results["collectives"] = _collectives(root)
    results["overlap"] = _overlap()
    results["checkpoint"] = {name: _resharded(save(), load(), root / name)
                             for name, (save, load, _) in RESHARDS.items()}
    return results


@functools.cache
def _results() -> tuple[list[dict[str, Any]], Path]:
    checkpoints = Path(tempfile.mkdtemp(prefix="mtnlg-zero-"))
    return run_world(_world, 4, str(checkpoints), timeout=300), checkpoints


@functools.cache
def _muon_reference() -> dict[str, Any]:
    return _train(_muon_config(), world_dims(_muon_config(), 1))


@pytest.mark.parametrize("layout", list(LAYOUTS) + list(MUON_LAYOUTS))
def test_five_steps_match_one_process(layout: str) -> None:
    ref = _muon_reference() if layout in MUON_LAYOUTS else _reference()
    seen: set[str] = set()
    for rank, result in enumerate(_results()[0]):
        got = result[layout]
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5), rank
        for name, value in got["final"].items():
            ref_name = "wte.weight" if name == "lm_head.weight" and name not in ref["final"] else name
            torch.testing.assert_close(value, ref["final"][ref_name], rtol=1e-5, atol=1e-5, msg=f"rank {rank} {name}")
        seen |= set(got["final"])
    assert set(ref["final"]) <= seen
    assert len(ref["losses"]) == STEPS


@pytest.mark.parametrize("zero", [1, 2])
def test_gradients_are_reduced_once_per_step_whatever_the_micro_batches(zero: int) -> None:
    for result in _results()[0]:
        got = result["collectives"][f"zero{zero}"]
        one, four = got["counts"]
        assert one == four  # 1 or 4 micro-batches per rank: the same collectives, the same bytes
        reduce = "all_reduce" if zero == 1 else "reduce_scatter_single"
        other = "reduce_scatter_single" if zero == 1 else "all_reduce"
        assert len(one[reduce]) == len(one["all_gather_single"]) == got["buckets"] > 1 and not one[other]
        expected = got["expected"]
        assert sum(one[reduce]) == sum(b for op, b in expected if op != "all_gather")
        assert sum(one["all_gather_single"]) == sum(b for op, b in expected if op == "all_gather")


def test_reductions_overlap_backward_and_state_is_sharded() -> None:
    results = _results()[0]
    assert all(r["overlap"] == r["collectives"]["zero1"]["buckets"] for r in results)  # all launched in backward
    single = _reference_optimizer_bytes()
    for r in results:  # dp=4: a quarter of one process's AdamW moments (within the padding of uneven rows)
        assert r["collectives"]["zero1"]["state_bytes"] == pytest.approx(single / 4, rel=0.02)


@functools.cache
def _reference_optimizer_bytes() -> int:
    trainer = world_trainer(_config(), Path(tempfile.mkdtemp()), 1)
    trainer.train_step()
    return sum(v.numel() * v.element_size() for s in trainer.optimizer.state.values()
               for k, v in s.items() if k != "step")


@pytest.mark.parametrize("kind", list(RESHARDS))
def test_a_checkpoint_resumes_in_another_layout_and_in_one_process(kind: str) -> None:
    """zero=1 dp2 x tp2 resumed under zero=3; Muon dp2 x tp2 (momenta of tp-sharded matrices) under dp2 x pp2."""
    results, checkpoints = _results()
    saved: dict[str, torch.Tensor] = {}
    for r in results:
        saved |= r["checkpoint"][kind]["saved"]
    for r in results:  # a pipeline's last stage holds the tied output layer as lm_head: the saved wte
        for name, value in r["checkpoint"][kind]["loaded"].items():
            assert torch.equal(value, saved[name if name in saved else name.replace("lm_head.", "wte.")]), name
    single = world_trainer(RESHARDS[kind][2](), checkpoints / kind, 1)
    assert single.resume() is not None
    loaded = full_states(single)
    assert set(loaded) == {k for k in saved if k in loaded} and len(loaded) == len(saved)
    for name, value in loaded.items():
        assert torch.equal(value, saved[name]), name
