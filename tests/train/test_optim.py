"""AdamW parameter groups, the warmup + cosine schedule and the batch-size ramp-up."""

from __future__ import annotations

import math

import pytest
import torch

from mtnlg.config import ConfigError, TrainConfig
from mtnlg.model.gpt import GPT
from mtnlg.train.optim import (
    build_optimizer,
    global_batch_size,
    learning_rate,
    parameter_groups,
    validate_batch_sizes,
)


def test_parameter_groups_split_matrices_from_biases_and_layernorm(small_model_config):
    model = GPT(small_model_config)
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert {"wte.weight", "wpe.weight", "blocks.0.attn.qkv_proj.weight", "blocks.1.mlp.fc_out.weight"} <= decay_names
    assert {"blocks.0.ln_1.weight", "blocks.0.ln_1.bias", "blocks.0.attn.qkv_proj.bias", "ln_f.weight"} <= (
        no_decay_names
    )
    # every parameter exactly once; the tied output layer is the embedding, not a second entry
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))
    assert "lm_head.weight" not in decay_names | no_decay_names
    _, no_decay = parameter_groups(model, 0.1, decay_position_embedding=False)
    assert "wpe.weight" in {names[id(p)] for p in no_decay["params"]}


def test_optimizer_uses_fused_adamw_with_the_recipe(small_model_config):
    cfg = TrainConfig(lr=3e-4, beta2=0.95, weight_decay=0.1)
    opt = build_optimizer(GPT(small_model_config), cfg)
    assert opt.defaults["fused"] is True
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_optimizer_no_decay_group_leaves_layernorm_alone(small_model_config):
    """With a zero gradient, AdamW's decoupled decay shrinks matrices only."""
    model = GPT(small_model_config)
    opt = build_optimizer(model, TrainConfig(lr=0.5, weight_decay=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    torch.testing.assert_close(after["wte.weight"], before["wte.weight"] * (1 - 0.5 * 0.1))
    torch.testing.assert_close(after["ln_f.weight"], before["ln_f.weight"], rtol=0, atol=0)


def test_step_schedule_values():
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, steps=110)
    lrs = [learning_rate(cfg, s, 0) for s in range(130)]
    assert lrs[0] == pytest.approx(0.1) and lrs[4] == pytest.approx(0.5)
    assert lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)  # peak at the end of warmup
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5)  # cosine half way: the mean of peak and floor
    assert lrs[35] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lrs[110] == pytest.approx(0.1) and lrs[129] == pytest.approx(0.1)  # constant after the decay
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    # decay_steps ends the decay before train.steps
    assert learning_rate(TrainConfig(lr=1.0, warmup_steps=0, steps=100, decay_steps=50), 50, 0) == pytest.approx(0.1)


def test_token_schedule_ignores_steps():
    cfg = TrainConfig(lr=2.0, min_lr_ratio=0.1, warmup_tokens=1000, decay_tokens=11000, warmup_steps=5, steps=10)
    assert learning_rate(cfg, step=7, consumed_tokens=499) == pytest.approx(1.0)
    assert learning_rate(cfg, step=0, consumed_tokens=6000) == pytest.approx(0.2 + 1.8 * 0.5)
    assert learning_rate(cfg, step=0, consumed_tokens=20000) == pytest.approx(0.2)


def test_batch_size_rampup_follows_megatron():
    """[start=16, increment=16, ramp=1000 samples] to 64: three increments, one per 333.3 samples."""
    cfg = TrainConfig(micro_batch_size=4, global_batch_size=64, rampup_batch_size=[16, 16, 1000])
    sizes = {s: global_batch_size(cfg, s) for s in (0, 333, 334, 666, 667, 999, 1000, 10**6)}
    assert sizes == {0: 16, 333: 16, 334: 32, 666: 32, 667: 48, 999: 48, 1000: 64, 10**6: 64}
    assert global_batch_size(TrainConfig(global_batch_size=64), 0) == 64
    validate_batch_sizes(cfg, dp=2)  # 16, 32, 48, 64 are all multiples of 4 x 2


@pytest.mark.parametrize(
    ("kwargs", "dp", "message"),
    [
        ({"micro_batch_size": 3, "global_batch_size": 8}, 1, "not a multiple of micro_batch_size"),
        ({"micro_batch_size": 4, "global_batch_size": 8}, 4, "4 x 4 = 16"),
        ({"micro_batch_size": 4, "global_batch_size": 64, "rampup_batch_size": [16, 20, 100]}, 1, "increment=20"),
        ({"micro_batch_size": 4, "global_batch_size": 64, "rampup_batch_size": [6, 2, 100]}, 1, r"ramp-up size\) 6"),
    ],
)
def test_batch_sizes_that_do_not_split_are_errors(kwargs, dp, message):
    with pytest.raises(ConfigError, match=message):
        validate_batch_sizes(TrainConfig(**kwargs), dp)
