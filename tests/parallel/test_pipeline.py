"""Pipeline parallelism (each schedule, pp=2 and pp=4, pp x tp) on gloo ranks against one process.

One world per size runs every layout in turn (a world costs seconds on 2 cores). For each, a
training step of the pipeline is compared with the plain model's accumulation loop on the same
batch: loss, global gradient norm and every gradient this rank holds, by parameter name.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor

from mtnlg.config import Config, ConfigError, ModelConfig, ParallelConfig, TrainConfig
from mtnlg.config.schedules import bubble_fraction, layer_split, stage_ids
from mtnlg.parallel.dims import ParallelDims
from mtnlg.parallel.pipeline import Pipeline, check_pipeline
from mtnlg.parallel.utils import loss_context
from mtnlg.train.build import build_model
from tests.harness.dist import run_world

TOL = 1e-5
CPU = torch.device("cpu")


def _config(pp: int, tp: int = 1, schedule: str = "1f1b", per_rank: int = 1, **model: Any) -> Config:
    shape = dict(vocab_size=120, seq_len=16, n_layers=8, hidden=32, n_heads=4, padded_vocab_multiple=64)
    return Config(
        model=ModelConfig(**{**shape, **model}),
        parallel=ParallelConfig(tp=tp, pp=pp, pp_schedule=schedule, pp_stages_per_rank=per_rank),
        train=TrainConfig(micro_batch_size=1, global_batch_size=8, eval_iters=8, device="cpu"),
    ).validate()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _reference(
    cfg: Config, inputs: torch.Tensor, targets: torch.Tensor, m: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Loss, gradients by name and gradient norm of the plain model's accumulation loop."""
    ref = build_model(cfg, CPU)
    loss = torch.zeros(())
    for x, y in zip(inputs.chunk(m), targets.chunk(m), strict=True):
        part = ref(x, y)
        (part / m).backward()
        loss += part.detach() / m
    grads = {name: p.grad for name, p in ref.named_parameters()}
    return loss, grads, torch.nn.utils.get_total_norm(list(grads.values()))


def _step_errors(cfg: Config, world_size: int) -> dict[str, float]:
    """Relative errors of one pipeline step against the reference, for the parameters this rank holds."""
    dims = ParallelDims(dp=1, pp=cfg.parallel.pp, tp=cfg.parallel.tp, world_size=world_size)
    dims.build_mesh()
    generator = torch.Generator().manual_seed(3)
    inputs, targets = torch.randint(0, cfg.model.vocab_size, (2, 8, cfg.model.seq_len), generator=generator)
    targets[0, :4] = -100  # ignored targets take part too
    ref_loss, ref_grads, ref_norm = _reference(cfg, inputs, targets, 8)
    model = build_model(cfg, CPU, dims)
    pipeline = Pipeline(model, dims, cfg)
    with loss_context(dims):
        loss = pipeline.step(inputs, targets, 8)
    norm = torch.nn.utils.get_total_norm([_full(p.grad) for p in pipeline.counted_parameters()])
    errors = {"loss": _rel_error(loss, ref_loss), "norm": _rel_error(pipeline.reduce_norm(norm), ref_norm)}
    for name, p in model.named_parameters():
        ref_name = "wte.weight" if name == "lm_head.weight" and cfg.model.tie_embeddings else name
        errors[f"grad {name}"] = _rel_error(_full(p.grad), ref_grads[ref_name])
    with loss_context(dims):
        errors["eval"] = _rel_error(pipeline.evaluate(inputs, targets, 8).mean(), ref_loss)
    return errors


LAYOUTS = {
    2: {
        "gpipe": dict(pp=2, schedule="gpipe"),
        "1f1b": dict(pp=2),
        "1f1b untied, 5 layers": dict(pp=2, n_layers=5, tie_embeddings=False),
        "interleaved_1f1b": dict(pp=2, schedule="interleaved_1f1b", per_rank=2),
        "interleaved_1f1b 7 layers": dict(pp=2, schedule="interleaved_1f1b", per_rank=2, n_layers=7),
        "zbv": dict(pp=2, schedule="zbv", per_rank=2),
        "dualpipev": dict(pp=2, schedule="dualpipev", per_rank=2),
        "dualpipev untied": dict(pp=2, schedule="dualpipev", per_rank=2, tie_embeddings=False),
    },
    4: {
        "gpipe": dict(pp=4, schedule="gpipe"),
        "1f1b": dict(pp=4),
        "interleaved_1f1b": dict(pp=4, schedule="interleaved_1f1b", per_rank=2),
        "zbv": dict(pp=4, schedule="zbv", per_rank=2),
        "dualpipev": dict(pp=4, schedule="dualpipev", per_rank=2),
        "pp2 x tp2 1f1b": dict(pp=2, tp=2),
        "pp2 x tp2 interleaved_1f1b untied": dict(pp=2, tp=2, schedule="interleaved_1f1b", per_rank=2,
                                                  tie_embeddings=False),
    },
}


def _world(world_size: int) -> dict[str, dict[str, float]]:
    return {name: _step_errors(_config(**layout), world_size) for name, layout in LAYOUTS[world_size].items()}


@functools.cache
def _results(world_size: int) -> list[dict[str, dict[str, float]]]:
    return run_world(_world, world_size, world_size, timeout=240)


@pytest.mark.parametrize(
    ("world_size", "layout"), [(w, name) for w, layouts in LAYOUTS.items() for name in layouts]
)
def test_one_step_matches_one_process(world_size: int, layout: str) -> None:
    ranks = [errors[layout] for errors in _results(world_size)]
    names = {name for errors in ranks for name in errors if name.startswith("grad ")}
    n_layers = _config(**LAYOUTS[world_size][layout]).model.n_layers
    assert {f"grad blocks.{i}.mlp.fc_in.weight" for i in range(n_layers)} <= names  # every layer somewhere
    for rank, errors in enumerate(ranks):
        bad = {name: e for name, e in errors.items() if not e <= TOL}
        assert not bad, f"rank {rank}: {bad}"


def test_layer_split_is_balanced_and_keeps_the_ends_light() -> None:
    assert [len(r) for r in layer_split(10, 4)] == [2, 3, 3, 2]
    assert [len(r) for r in layer_split(105, 35)] == [3] * 35
    sizes = [len(r) for r in layer_split(105, 8)]
    assert sum(sizes) == 105 and max(sizes) - min(sizes) == 1 and sizes[0] == sizes[-1] == 13
    split = layer_split(7, 3)
    assert [list(r) for r in split] == [[0, 1], [2, 3, 4], [5, 6]]
    with pytest.raises(ConfigError, match="model.n_layers=2 cannot fill 4 pipeline stages"):
        layer_split(2, 4)


def test_stage_placement() -> None:
    assert [stage_ids(r, 4, 2, "interleaved_1f1b") for r in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [stage_ids(r, 4, 2, "zbv") for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]


def _check(pp: int = 2, dp: int = 1, **changes: Any) -> None:
    cfg = _config(pp, schedule=changes.pop("schedule", "1f1b"), per_rank=changes.pop("per_rank", 1))
    for section, values in changes.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    check_pipeline(cfg, ParallelDims(dp=dp, pp=pp, tp=1, world_size=dp * pp))


def test_bad_layouts_are_config_errors_naming_the_fields() -> None:
    """Each of these would otherwise abort or hang inside a collective; here they fail before any."""
    _check()  # the base layout is valid
    with pytest.raises(ConfigError, match="do not split into parallel.pp_microbatches=3 equal micro-batches"):
        _check(parallel={"pp_microbatches": 3})
    with pytest.raises(ConfigError, match="ramp-up size\\) 6 .* parallel.pp_microbatches=4"):
        _check(parallel={"pp_microbatches": 4}, train={"rampup_batch_size": [4, 2, 8]})
    with pytest.raises(ConfigError, match="1f1b needs at least as many micro-batches as stages"):
        _check(pp=4, train={"global_batch_size": 2})
    with pytest.raises(ConfigError, match="interleaved_1f1b .*pp_microbatches=5 is not a multiple of its 2 rounds"):
        _check(schedule="interleaved_1f1b", per_rank=2, parallel={"pp_microbatches": 5},
               train={"global_batch_size": 10})
    with pytest.raises(ConfigError, match="dualpipev needs at least 2 x parallel.pp = 8 micro-batches"):
        _check(pp=4, schedule="dualpipev", per_rank=2, train={"global_batch_size": 4})
    with pytest.raises(ConfigError, match="1f1b runs one stage per rank: set parallel.pp_stages_per_rank=1"):
        _check(per_rank=2)
    with pytest.raises(ConfigError, match="zbv is a V schedule: set parallel.pp_stages_per_rank=2"):
        _check(schedule="zbv")
    with pytest.raises(ConfigError, match="fp16"):
        _check(train={"precision": "fp16"})
    with pytest.raises(ConfigError, match="pp_schedule='2f2b' is unknown"):
        ParallelConfig(pp_schedule="2f2b").validate()


def test_bubble_fraction() -> None:
    assert bubble_fraction("1f1b", pp=4, microbatches=8) == pytest.approx(3 / 11)
    assert bubble_fraction("gpipe", pp=35, microbatches=1920) == pytest.approx(34 / 1954)
    assert bubble_fraction("interleaved_1f1b", pp=4, microbatches=8, stages_per_rank=2) == pytest.approx(3 / 19)
    assert bubble_fraction("1f1b", pp=1, microbatches=8) == 0.0
    assert bubble_fraction("zbv", pp=4, microbatches=8, stages_per_rank=2) == 0.0
