"""Tensor (+ sequence) parallelism on 2 and 4 gloo ranks against the single-process model.

Each world runs every check for its tp size in one go (a world costs seconds on 2 cores); the
rank functions return numbers and token lists, and the tests assert on them here.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from mtnlg.config import Config, ConfigError, ModelConfig, ParallelConfig
from mtnlg.generate.engine import Engine, SamplingParams
from mtnlg.generate.quantize import prepare_for_inference
from mtnlg.model.gpt import GPT
from mtnlg.parallel.dims import ParallelDims, init_distributed
from mtnlg.parallel.parallelize import parallelize
from mtnlg.parallel.tensor import check_tp_compatible
from mtnlg.parallel.utils import loss_context
from tests.harness.dist import run_world

RTOL = 1e-5  # fp32: the gathered result may differ from one process only by reduction order
SINGLE = ParallelDims(dp=1, pp=1, tp=1, world_size=1)


def _config(tp: int, sequence_parallel: bool = False, **model: Any) -> Config:
    shape = dict(vocab_size=300, seq_len=32, n_layers=2, hidden=64, n_heads=4, padded_vocab_multiple=64)
    return Config(
        model=ModelConfig(**{**shape, **model}),
        parallel=ParallelConfig(tp=tp, sequence_parallel=sequence_parallel),
    )


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _batch(seed: int, B: int = 2, T: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx, targets = torch.randint(0, 300, (2, B, T), generator=g)
    targets[0, :3] = -100  # ignored positions take part too
    return idx, targets


def _loss_and_grads(
    model: GPT, dims: ParallelDims, seed: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    idx, targets = _batch(seed)
    with loss_context(dims):
        loss = model(idx, targets)
        loss.backward()
    return _full(loss).detach(), {n: _full(p.grad) for n, p in model.named_parameters()}


def _rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest deviation relative to the reference tensor's scale."""
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _compare(got: tuple, ref: tuple) -> dict[str, float]:
    (loss, grads), (ref_loss, ref_grads) = got, ref
    assert grads.keys() == ref_grads.keys()
    errors = {name: _rel_error(grads[name], ref_grads[name]) for name in ref_grads}
    return {"loss": _rel_error(loss, ref_loss), **{f"grad {n}": e for n, e in errors.items()}}


def _grads_check(dims: ParallelDims, sequence_parallel: bool, **model_args: Any) -> dict[str, float]:
    """Relative errors of loss and every gathered gradient, tp model vs a plain copy."""
    cfg = _config(dims.tp, sequence_parallel, **model_args)
    torch.manual_seed(0)
    ref = GPT(cfg.model)
    par = parallelize(copy.deepcopy(ref), dims, cfg)
    assert par.lm_head.weight is par.wte.weight  # the tie survived sharding
    torch.manual_seed(1)  # same dropout draws for both when dropout > 0
    got = _loss_and_grads(par, dims, seed=2)
    torch.manual_seed(1)
    return _compare(got, _loss_and_grads(ref, SINGLE, seed=2))


@torch.no_grad()
def _generation_check(dims: ParallelDims) -> dict[str, Any]:
    """Logits and generated tokens (the engine: batched, padded, KV-cached) of the tp and plain models."""
    cfg = _config(dims.tp, sequence_parallel=True, init_std=0.3)  # inference turns SP off; wide init: varied
    torch.manual_seed(0)
    ref = GPT(cfg.model).eval()
    par = parallelize(copy.deepcopy(ref), dims, cfg, inference=True)
    prompt = _batch(3, B=2, T=5)[0]
    out: dict[str, Any] = {"logits": _rel_error(par(prompt), ref(prompt))}
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41]]  # different lengths: left padding, masks, positions
    greedy = SamplingParams(temperature=0, max_new_tokens=12, ignore_eod=True)
    sampled = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, max_new_tokens=12, seed=7, ignore_eod=True)
    for name, params in (("greedy", greedy), ("sampled", sampled)):
        out[name] = [[c.tokens for c in Engine(model).generate(prompts, params)] for model in (par, ref)]
    return out


def _recording_sdpa(masks: list[torch.Tensor]) -> Any:
    """Math attention whose dropout keep-mask (drawn from the default generator) is recorded."""

    def sdpa(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
    ) -> torch.Tensor:
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if is_causal:
            attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        keep = torch.rand(scores.shape) >= dropout_p
        masks.append(keep)
        return (scores.softmax(-1) * keep / (1 - dropout_p)) @ v

    return sdpa


def _dropout_masks(dims: ParallelDims, sequence_parallel: bool) -> dict[str, torch.Tensor]:
    """This rank's dropout masks in one training forward: residual-stream dropouts and attention's."""
    cfg = _config(dims.tp, sequence_parallel, dropout=0.5)
    torch.manual_seed(0)
    model = parallelize(GPT(cfg.model), dims, cfg).train()
    masks: dict[str, torch.Tensor] = {}
    for name in ("drop", "blocks.0.attn.resid_dropout", "blocks.0.mlp.dropout"):
        module = model.get_submodule(name)
        module.register_forward_hook(lambda m, i, out, name=name: masks.__setitem__(name, out == 0))
    attention: list[torch.Tensor] = []
    real_sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _recording_sdpa(attention)
    try:
        with loss_context(dims):
            model(*_batch(4))
    finally:
        F.scaled_dot_product_attention = real_sdpa
    return {**masks, "attention": attention[0]}


def _train_trace(dims: ParallelDims, sequence_parallel: bool, steps: int = 10) -> dict[str, list[float]]:
    """Loss of each of ``steps`` AdamW steps with gradient clipping, tp model and plain model.

    Every step sees the same batch of random tokens, so a model that trains must lower its loss.
    """
    cfg = _config(dims.tp, sequence_parallel)
    torch.manual_seed(0)
    ref = GPT(cfg.model)
    traces = {}
    for name, model, model_dims in (
        ("ref", ref, SINGLE),
        ("tp", parallelize(copy.deepcopy(ref), dims, cfg), dims),
    ):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        traces[name] = []
        for _ in range(steps):
            loss, _ = _loss_and_grads(model, model_dims, seed=100)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            opt.zero_grad(set_to_none=True)
            traces[name].append(loss.item())
    return traces


def _error(fn: Any) -> str:
    try:
        fn()
    except (ConfigError, RuntimeError, TypeError) as exc:
        return str(exc)
    return "no error"


def _compare_checkpointing(dims: ParallelDims, sequence_parallel: bool) -> dict[str, float]:
    """With dropout, recomputing blocks in backward must replay the same masks on every rank."""
    results = []
    for checkpointing in (False, True):
        cfg = _config(dims.tp, sequence_parallel, dropout=0.3, activation_checkpointing=checkpointing)
        torch.manual_seed(0)
        model = parallelize(GPT(cfg.model), dims, cfg).train()
        torch.manual_seed(1)
        results.append(_loss_and_grads(model, dims, seed=5))
    return _compare(results[1], results[0])


def _world(tp: int) -> dict[str, Any]:
    """Everything checked on a world of ``tp`` ranks (training checks on tp=2 only, to save time)."""
    dims = init_distributed(ParallelConfig(tp=tp))
    out: dict[str, Any] = {"tp_rank": dims.tp_rank}
    for sp in (False, True):
        out[f"grads sp={sp}"] = _grads_check(dims, sp)
        out[f"dropout sp={sp}"] = _dropout_masks(dims, sp)
        if tp == 2:
            out[f"checkpointed dropout sp={sp}"] = _compare_checkpointing(dims, sp)
            out[f"train sp={sp}"] = _train_trace(dims, sp)
    out["generate"] = _generation_check(dims)
    out["world mismatch"] = _error(lambda: init_distributed(ParallelConfig(tp=tp, dp=2)))
    odd = _config(tp, n_heads=tp + 1, hidden=4 * (tp + 1))
    out["heads"] = _error(lambda: parallelize(GPT(odd.model), dims, odd))
    cfg = _config(tp)
    out["no loss context"] = _error(lambda: parallelize(GPT(cfg.model), dims, cfg)(*_batch(0)))
    out["converted"] = _error(lambda: parallelize(prepare_for_inference(GPT(cfg.model)), dims, cfg))
    return out


@functools.cache
def _results(tp: int) -> list[dict[str, Any]]:
    """One world per tp size for the whole test session; each rank's results in rank order."""
    return run_world(_world, tp, tp, timeout=240)


@pytest.fixture(params=[2, 4], ids=lambda tp: f"tp{tp}")
def world(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return _results(request.param)


@pytest.fixture
def world2() -> list[dict[str, Any]]:
    return _results(2)


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_loss_and_every_gradient_match_single_process(world: list[dict[str, Any]], sp: bool) -> None:
    for rank in world:
        errors = rank[f"grads sp={sp}"]
        assert len(errors) == 1 + 2 + 12 * 2 + 2  # loss, wte/wpe, 12 tensors per block, ln_f
        worst = max(errors, key=errors.get)
        assert errors[worst] < RTOL, f"{worst}: relative error {errors[worst]:.2e}"


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_ten_training_steps_match_single_process(world2: list[dict[str, Any]], sp: bool) -> None:
    trace = world2[0][f"train sp={sp}"]
    assert trace["tp"] == pytest.approx(trace["ref"], rel=1e-4)
    assert trace["ref"][-1] < trace["ref"][0]  # it trains


def test_generation_matches_single_process_token_for_token(world: list[dict[str, Any]]) -> None:
    for rank in world:
        gen = rank["generate"]
        assert gen["logits"] < RTOL
        tp_tokens, ref_tokens = gen["greedy"]
        assert tp_tokens == ref_tokens
        assert len({t for row in ref_tokens for t in row}) > 3  # not a degenerate repetition
        assert gen["sampled"][0] == gen["sampled"][1]  # seeded sampling too: every rank picks the same token


def test_dropout_masks_agree_where_replicated_and_differ_where_sharded(world: list[dict[str, Any]]) -> None:
    first, others = world[0], world[1:]
    for rank in others:
        plain, seq = rank["dropout sp=False"], rank["dropout sp=True"]
        for name in ("drop", "blocks.0.attn.resid_dropout", "blocks.0.mlp.dropout"):
            assert torch.equal(plain[name], first["dropout sp=False"][name]), (
                f"{name}: replicated, masks must agree"
            )
            assert not torch.equal(seq[name], first["dropout sp=True"][name]), (
                f"{name}: sequence shards share a mask"
            )
        for sp_masks, first_masks in ((plain, first["dropout sp=False"]), (seq, first["dropout sp=True"])):
            assert not torch.equal(sp_masks["attention"], first_masks["attention"]), (
                "heads of two ranks share a mask"
            )
    for rank in world:  # dropout really drops about half (p = 0.5)
        assert 0.4 < rank["dropout sp=True"]["attention"].float().mean() < 0.6


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_activation_checkpointing_replays_the_same_dropout(world2: list[dict[str, Any]], sp: bool) -> None:
    for rank in world2:
        errors = rank[f"checkpointed dropout sp={sp}"]
        assert max(errors.values()) < RTOL


def test_misuse_fails_clearly_in_a_world(world: list[dict[str, Any]]) -> None:
    assert "processes, but the world has" in world[0]["world mismatch"]
    assert "model.n_heads" in world[0]["heads"]
    assert "inside `with mtnlg.parallel.loss_context(dims):`" in world[0]["no loss context"]
    assert "parallelize the plain model (mtnlg.checkpoint.model.load_model)" in world[0]["converted"]


def test_impossible_layouts_name_the_field() -> None:
    cfg = _config(1).model
    with pytest.raises(ConfigError, match="model.n_heads=4 is not divisible by parallel.tp=3"):
        check_tp_compatible(cfg, 3)
    with pytest.raises(ConfigError, match="padded vocabulary 301 .*model.padded_vocab_multiple"):
        check_tp_compatible(_config(1, vocab_size=301, padded_vocab_multiple=1).model, 2)
    with pytest.raises(ConfigError, match="model.seq_len=30 must be divisible"):
        check_tp_compatible(_config(1, seq_len=30).model, 4, sequence_parallel=True)
    with pytest.raises(ConfigError, match="tp=2 = 4 processes, but the world has 2"):
        ParallelDims.from_config(ParallelConfig(tp=2, dp=2), world_size=2)
    with pytest.raises(ConfigError, match="world size 3 is not divisible by parallel.tp=2"):
        ParallelDims.from_config(ParallelConfig(tp=2), world_size=3)
    with pytest.raises(ConfigError, match="generation runs on tensor-parallel ranks only"):
        parallelize(GPT(cfg), ParallelDims(dp=2, pp=1, tp=1, world_size=2), _config(1), inference=True)
    with pytest.raises(ConfigError, match="dp_replicate=3 does not divide the data-parallel size 2"):
        ParallelDims.from_config(ParallelConfig(dp_replicate=3), world_size=2)
    with pytest.raises(ConfigError, match="dp_replicate=1 x parallel.dp_shard=4 must equal the data-parallel size 2"):
        ParallelDims.from_config(ParallelConfig(dp_shard=4), world_size=2)


def test_single_process_is_left_alone() -> None:
    cfg = _config(1)
    model = GPT(cfg.model)
    dims = init_distributed(cfg.parallel, device="cpu")
    assert dims.mesh is None and not dims.tp_enabled
    assert parallelize(model, dims, cfg) is model
    assert isinstance(loss_context(dims), contextlib.nullcontext)
    assert not any(isinstance(p, DTensor) for p in model.parameters())
