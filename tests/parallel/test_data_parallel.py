"""Data parallelism (FSDP2, HSDP, and with tp and pp) on gloo ranks against one process.

Each layout trains 5 steps of the real ``Trainer`` on a global batch of 8; the test process runs
the same 5 steps in one process and compares the initial weights (bit for bit), every step's
loss and the final weights. The 4-rank world then checks that checkpoints reshard: saved under
one layout (or by one process), loaded under another, the model and optimizer states are the
saver's, entry by entry.
"""

from __future__ import annotations

import functools
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor

from mtnlg.config import Config, ModelConfig, ParallelConfig, TrainConfig
from mtnlg.parallel.dims import ParallelDims
from mtnlg.train.build import build_model
from mtnlg.train.trainer import Trainer
from tests.harness.dist import run_world
from tests.harness.training import RandomTokens, full_states, world_dims, world_trainer

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
        "cp2 x pp2": dict(cp=2, pp=2),  # every stage reads the rank's global positions
    },
}


def _world(world_size: int, checkpoints: str) -> dict[str, dict[str, Any]]:
    out = {name: _train(_config(**layout), world_dims(_config(**layout), world_size))
           for name, layout in LAYOUTS[world_size].items()}
    if world_size == 4:
        out |= _reshard_world(Path(checkpoints))
    return out


# (saved by, loaded under): "one process" saves in the test process, before the world starts.
RESHARDS = [("one process", "dp2 x pp2"), ("dp2 x pp2", "dp2 x tp2"), ("dp2 x tp2", "dp2 x pp2")]


def _layout_config(layout: str) -> Config:
    return _config(**LAYOUTS[4].get(layout, {}))  # "one process": the defaults


def _save_after_one_step(layout: str, checkpoints: Path, world_size: int) -> dict[str, torch.Tensor]:
    trainer = world_trainer(_layout_config(layout), checkpoints / layout, world_size)
    trainer.train_step()
    trainer.save()
    return full_states(trainer)


def _reshard_world(checkpoints: Path) -> dict[str, dict[str, Any]]:
    saved = {saver: _save_after_one_step(saver, checkpoints, 4) for saver, _ in RESHARDS if saver != "one process"}
    loaded = {}
    for saver, loader in RESHARDS:
        trainer = world_trainer(_layout_config(loader), checkpoints / saver, 4)
        assert trainer.resume() is not None
        loaded[f"{saver} -> {loader}"] = {"saved": saved.get(saver), "loaded": full_states(trainer)}
    return loaded


@functools.cache
def _results(world_size: int) -> list[dict[str, dict[str, Any]]]:
    checkpoints = Path(tempfile.mkdtemp(prefix="mtnlg-reshard-"))
    if world_size == 4:
        _single_saved[:] = [_save_after_one_step("one process", checkpoints, 1)]
    return run_world(_world, world_size, world_size, str(checkpoints), timeout=300)


_single_saved: list[dict[str, torch.Tensor]] = []


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


def _saver_name(name: str, saved: dict[str, torch.Tensor]) -> str:
    """A pipeline stage's tied copy of the embedding holds what the saver kept as ``wte.weight``."""
    return name if name in saved else name.replace("lm_head.weight", "wte.weight")


@pytest.mark.parametrize(("saver", "loader"), RESHARDS)
def test_checkpoints_reshard_with_the_savers_model_and_optimizer_state(saver: str, loader: str) -> None:
    results = _results(4)
    seen: set[str] = set()
    for rank, result in enumerate(results):
        got = result[f"{saver} -> {loader}"]
        saved = _single_saved[0] if saver == "one process" else {}
        if not saved:  # a parallel saver: the union of its ranks' entries (pipeline ranks hold different ones)
            for other in results:
                saved |= other[f"{saver} -> {loader}"]["saved"]
        for name, value in got["loaded"].items():
            assert torch.equal(value, saved[_saver_name(name, saved)]), (rank, name)
        seen |= set(got["loaded"])
    # Every entry came back (the output layer is tied: a pipeline's copy and the embedding are one entry).
    tied = functools.partial(re.sub, r"\blm_head\.weight\b", "wte.weight")
    assert {tied(n) for n in seen} >= {tied(n) for n in saved if n.startswith(("model.", "optim.state."))}
